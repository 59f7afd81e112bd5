"""`framecast demo` as a user runs it: its own broker and Ray head, every frame accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from cluster.processes import free_port
from cluster.ray_head import LocalRayHead
from cluster.settings import RaySettings
from tests.conftest import REPO, run_cli


def _processes_of(markers: tuple[str, ...]) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info.get("cmdline") or [])
        if any(marker in command for marker in markers):
            found.append(f"{process.info['pid']}: {command[:200]}")
    return found


def test_demo_labels_every_frame_writes_its_report_and_leaves_no_process(tmp_path: Path) -> None:
    env = {
        "FRAMECAST_KAFKA_LIBS": str(REPO / ".framecast" / "kafka" / "libs"),
        "FRAMECAST_KAFKA_EMBEDDED_PORT": str(free_port()),
        "FRAMECAST_RAY_GCS_PORT": str(free_port()),
        "FRAMECAST_RAY_DASHBOARD_PORT": str(free_port()),
        "FRAMECAST_RAY_NUM_CPUS": "2",
        "FRAMECAST_SERVE_HTTP_PORT": str(free_port()),
    }
    markers = (str(tmp_path), str(LocalRayHead(tmp_path, RaySettings()).temp_dir))
    try:
        done = run_cli(
            "demo", "--preset", "fashion-mnist", "--cameras", "3", "--fps", "20", "--seconds", "4",
            home=tmp_path, env=env, timeout=420,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        leftovers = _processes_of(markers)
        if leftovers:  # stop them for the next tests, then fail
            run_cli("down", home=tmp_path, env=env)
    assert leftovers == []

    report_dir = tmp_path / "reports" / "demo"
    report = json.loads((report_dir / "demo.json").read_text())
    assert report["frames_planned"] == 3 * 80
    assert report["frames_produced"] == 240
    assert report["labels"] == 240  # no deadline: every frame labelled
    assert report["dropped_deadline"] == 0
    assert report["dlq"] == 0
    assert report["unaccounted"] == 0
    assert report["model"]["runtime"] == "litert"
    # The synthetic garments move across a 32 px frame; the shipped model is ~93 % on still ones.
    assert report["online_accuracy"] > 0.6
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert sum(w["frames"] for w in report["latency_ms_by_window"]) == 240
    assert report["preset"] == "fashion-mnist"
    assert report["decode"]["p50_ms"] > 0  # the replicas decode each PNG frame
    assert (report_dir / "latency_histogram.png").stat().st_size > 1000
    assert "| frames produced / labelled | 240 / 240 |" in (report_dir / "demo.md").read_text()
    assert "demo summary" in done.stdout
