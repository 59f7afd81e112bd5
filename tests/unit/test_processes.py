"""cluster.processes: telling our own processes from others."""

from __future__ import annotations


def test_process_alive_survives_a_wall_clock_step_only_for_our_own_command_line() -> None:
    """A create time read after the wall clock stepped is off; the command line decides."""
    import subprocess
    import sys

    import psutil

    from cluster.processes import process_alive

    marker = "framecast-process-alive-marker"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    try:
        recorded = psutil.Process(child.pid).create_time()
        assert process_alive(child.pid, recorded)
        stepped = recorded - 46.0  # what the clock step of a resumed VM made of it
        assert not process_alive(child.pid, stepped)  # no marker: treated as a reused pid
        assert process_alive(child.pid, stepped, marker)
        assert not process_alive(child.pid, stepped, "another-brokers-config")
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, recorded, marker)
