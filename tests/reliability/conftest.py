"""Fixtures of the reliability tests: a Serve app of their own, replica kills, the figures.

Each scenario records its figures (frames sent, labels received, duplicates, losses) with
the ``figures`` fixture; at the end of the session they are written as JSON to
``$FRAMECAST_RELIABILITY_FIGURES`` (default ``.framecast/reliability-figures.json``) and
summarised in the terminal, for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.ray_head import RayHeadInfo
from tests.conftest import REPO

_FIGURES: dict[str, dict[str, Any]] = {}
FIGURES_FILE = Path(
    os.environ.get(
        "FRAMECAST_RELIABILITY_FIGURES", REPO / ".framecast" / "reliability-figures.json"
    )
)

Record = Callable[..., None]


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Record:
    """record(**numbers) files this test's figures under its node id (merged across calls)."""

    def record(**numbers: Any) -> None:
        _FIGURES.setdefault(request.node.nodeid, {}).update(numbers)

    return record


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _FIGURES:
        return
    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(FIGURES_FILE.read_text())
    previous.update(_FIGURES)
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    FIGURES_FILE.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for node, numbers in _FIGURES.items():
            terminalreporter.write_line(f"{node}: {json.dumps(numbers, sort_keys=True)}")


# -- Serve ---------------------------------------------------------------------------------------

RELIABILITY_APP = "reliability"


def reliability_settings(serve_port: int, app: str = RELIABILITY_APP, **extra: Any) -> Any:
    """ServeSettings of a one-replica app at /<app> (0.5 CPU: several fit the test head)."""
    from serving.config import ServeSettings

    return ServeSettings(
        app_name=app,
        route_prefix=f"/{app}",
        http_port=serve_port,
        num_cpus=0.5,
        min_replicas=1,
        max_replicas=1,
        **extra,
    )


@pytest.fixture(scope="session")
def reliability_app(serve_port: int, served_artifact: Path) -> Iterator[str]:
    """The shipped model as a Serve app of the reliability tests' own (its replicas get killed)."""
    from ray import serve

    from serving.deploy import deploy

    settings = reliability_settings(serve_port)
    deploy(served_artifact, settings, address=None, namespace="framecast-tests", timeout_s=300)
    yield RELIABILITY_APP
    serve.delete(RELIABILITY_APP)


class Replicas:
    """Find and crash the Classifier replicas of a Serve app (Ray state API of the test head)."""

    def __init__(self, dashboard_url: str) -> None:
        self.dashboard_url = dashboard_url

    def _alive(self, app: str) -> list[Any]:
        from ray.util.state import list_actors

        return list_actors(
            address=self.dashboard_url,
            filters=[
                ("class_name", "=", f"ServeReplica:{app}:Classifier"),
                ("state", "=", "ALIVE"),
            ],
        )

    def pids(self, app: str) -> list[int]:
        """Process ids of the app's live Classifier replicas."""
        return [int(a.pid) for a in self._alive(app) if a.pid]

    def nodes(self, app: str) -> dict[int, str]:
        """The app's live Classifier replicas: process id -> the Ray node id it runs on."""
        return {int(a.pid): str(a.node_id) for a in self._alive(app) if a.pid}

    def kill(self, app: str, timeout_s: float = 60) -> list[int]:
        """SIGKILL every live replica of app (a crash, not a drain); returns the pids killed."""
        deadline = time.monotonic() + timeout_s
        pids = self.pids(app)
        while not pids and time.monotonic() < deadline:
            time.sleep(0.5)
            pids = self.pids(app)
        assert pids, f"no live replica of {app} to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def wait_replaced(self, app: str, killed: list[int], timeout_s: float = 180) -> list[int]:
        """Wait until Serve has started a replacement replica; returns its pids."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = [p for p in self.pids(app) if p not in killed]
            if pids:
                return pids
            time.sleep(1)
        raise AssertionError(f"Serve did not replace the killed replicas {killed} of {app}")


@pytest.fixture(scope="session")
def replicas(ray_head: RayHeadInfo) -> Replicas:
    return Replicas(ray_head.dashboard_url)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@contextlib.contextmanager
def own_broker(home: Path, libs: Path) -> Iterator[Any]:
    """A single embedded broker of a module's own (256 MiB heap), for tests that kill it."""
    from cluster.kafka_broker import EmbeddedKafka
    from cluster.processes import free_port

    broker = EmbeddedKafka(home, libs_dir=libs, port=free_port(), heap_mb=256)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
