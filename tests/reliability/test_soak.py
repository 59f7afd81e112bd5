"""Soak: minutes of steady load with periodic faults; input set = output set, memory stable.

Outside the default run (``-m 'not soak'``); ``make soak`` runs it. ``FRAMECAST_SOAK_S``
sets the length (default 240 s). Faults cycle every ``FRAMECAST_SOAK_FAULT_EVERY_S``
(default 30 s): a Serve replica SIGKILLed, a classifier process SIGKILLed and restarted,
the broker SIGKILLed and restarted. One classifier process lives through it all; its
resident memory is sampled to show it does not grow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cluster.kafka_broker import EmbeddedKafka
from cluster.ray_head import RayHeadInfo
from streams.config import KafkaSettings
from tests.reliability.conftest import Record, Replicas, own_broker
from tests.streaming import (
    Feeder,
    labels_of,
    read_topic,
    stream_run_argv,
    stream_run_env,
    tally,
    topics,
)

SOAK_S = float(os.environ.get("FRAMECAST_SOAK_S", "240"))
FAULT_EVERY_S = float(os.environ.get("FRAMECAST_SOAK_FAULT_EVERY_S", "30"))
FPS = 10.0  # per stream
STREAMS = 3

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(SOAK_S) + 900)]


@pytest.fixture(scope="module")
def soak_broker(
    tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path
) -> Iterator[EmbeddedKafka]:
    with own_broker(tmp_path_factory.mktemp("soak-kafka"), kafka_libs) as broker:
        yield broker


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(argv, env=stream_run_env(), stdout=handle, stderr=subprocess.STDOUT)


def test_soak_with_periodic_faults(
    soak_broker: EmbeddedKafka,
    reliability_app: str,
    replicas: Replicas,
    ray_head: RayHeadInfo,
    tmp_path: Path,
    figures: Record,
) -> None:
    settings = KafkaSettings(bootstrap_servers=soak_broker.bootstrap_servers)
    config = topics(settings, partitions=4)

    def argv(name: str) -> list[str]:
        return stream_run_argv(
            settings,
            config,
            reliability_app,
            ray_head,
            tmp_path / name,
            "--consumer-id",
            name,
            "--max-batch",
            "32",
            idle_exit_s=20.0,
        )

    feeder = Feeder(
        settings, config.frames_topic, streams=STREAMS, per_stream=int(SOAK_S * FPS), fps=FPS
    )
    steady = _spawn(argv("steady"), tmp_path / "steady.log")
    churn = _spawn(argv("churn"), tmp_path / "churn.log")
    feeder.start()
    faults: list[dict[str, Any]] = []
    rss: list[tuple[float, float]] = []
    started = time.monotonic()
    kinds = ["replica", "classifier", "broker"]
    next_fault = started + FAULT_EVERY_S
    try:
        while feeder.is_alive():
            now = time.monotonic()
            rss.append((now - started, psutil.Process(steady.pid).memory_info().rss / 2**20))
            assert steady.poll() is None, (tmp_path / "steady.log").read_text()[-3000:]
            if now >= next_fault:
                kind = kinds[len(faults) % len(kinds)]
                if kind == "replica":
                    replicas.kill(reliability_app)
                elif kind == "classifier":
                    churn.send_signal(signal.SIGKILL)
                    churn.wait(30)
                    churn = _spawn(argv("churn"), tmp_path / "churn.log")
                else:
                    info = soak_broker.info()
                    assert info is not None
                    os.kill(info.pid, signal.SIGKILL)
                    time.sleep(2)
                    soak_broker.start()
                faults.append({"at_s": round(now - started, 1), "kind": kind})
                next_fault = time.monotonic() + FAULT_EVERY_S
            time.sleep(1)
        expected = feeder.finish()
        outcomes = {}
        for name, proc in (("steady", steady), ("churn", churn)):
            proc.wait(timeout=600)
            log = (tmp_path / f"{name}.log").read_text()
            assert proc.returncode == 0, log[-3000:]
            outcomes[name] = json.loads(log.strip().splitlines()[-1])
    finally:
        feeder.stop_event.set()
        for proc in (steady, churn):
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    labels = labels_of(read_topic(settings, config.labels_topic, len(expected), timeout_s=180))
    counts = tally(expected, labels)
    warm = [mb for t, mb in rss if t >= SOAK_S * 0.25]
    growth = (warm[-1] - min(warm)) if warm else 0.0
    figures(
        **counts,
        seconds=round(time.monotonic() - started, 1),
        faults=[f["kind"] for f in faults],
        steady_rss_mb_after_warmup=round(min(warm), 1) if warm else None,
        steady_rss_mb_at_end=round(warm[-1], 1) if warm else None,
        labelled_by=outcomes,
    )
    assert len(faults) >= 3, faults
    assert counts["losses"] == 0 and counts["unexpected"] == 0, counts
    # Stable memory: after warm-up the long-lived classifier grows by less than 64 MiB.
    assert growth < 64, rss[-20:]
