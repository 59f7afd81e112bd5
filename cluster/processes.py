"""Small process and port primitives shared by the embedded broker and the Ray head."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psutil


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def process_alive(
    pid: int | None, create_time: float | None = None, marker: str | None = None
) -> bool:
    """True when pid runs and (if given) was created at create_time, so a reused pid is no match.

    A process's create time is wall-clock based (boot time + ticks since boot), and the boot
    time moves when the wall clock steps (a VM resumed from a pause, NTP): a broker started
    minutes ago then reads 46 s off. So a mismatch alone does not prove a reused pid; with
    ``marker`` (a string only our process's command line holds, e.g. its config file) the
    command line decides.
    """
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is None or abs(proc.create_time() - create_time) < 1.0:
            return True
        return marker is not None and marker in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def terminate(processes: Iterable[psutil.Process], timeout: float) -> list[int]:
    """SIGTERM, wait up to timeout, then SIGKILL what is left; returns the pids killed hard."""
    procs = list(processes)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [proc.pid for proc in alive]


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in path, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


T = TypeVar("T")


def read_state(path: Path, kind: Callable[..., T]) -> T | None:
    """The state file at path as a ``kind`` (a dataclass); None when missing, unreadable or
    of another shape (written by another version)."""
    state = read_json(path)
    if state is None:
        return None
    try:
        return kind(**state)
    except TypeError:
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write data atomically (write then rename), so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file ('' when absent)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll predicate() until it is truthy or timeout passes; returns the last outcome."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
