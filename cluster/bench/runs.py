"""What the pipeline and scaling benches share: a run's fresh topics, its labels read back,
and their summary (sustained frames/s, end-to-end percentiles, where the time goes)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from cluster.settings import FramecastSettings
from streams.config import TopicSettings


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile of values, to 3 decimals; None for no values."""
    return round(float(np.percentile(values, q)), 3) if values else None


def fresh_topics(settings: FramecastSettings, bootstrap: str, partitions: int) -> TopicSettings:
    """Four new topics for one run (frames, labels, latency, DLQ), created."""
    from streams.client import admin_client
    from streams.topics import default_topic_specs, ensure_topics, run_topics

    topics = run_topics(settings.topics, "bench", partitions)
    with admin_client(settings.kafka, bootstrap) as admin:
        ensure_topics(admin, default_topic_specs(topics))
    return topics


def drop_topics(settings: FramecastSettings, bootstrap: str, names: dict[str, str]) -> None:
    """Delete a run's topics."""
    from streams.client import admin_client

    with admin_client(settings.kafka, bootstrap) as admin:
        admin.delete_topics(list(names.values()))


def read_labels(
    settings: FramecastSettings, bootstrap: str, topic: str, expected: int, timeout_s: float
) -> list[dict[str, Any]]:
    """The labels on topic from the start, until `expected` of them or `timeout_s`."""
    from streams.client import topic_reader

    consumer = topic_reader(settings.kafka, bootstrap, topic, logging.getLogger(__name__))
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=1.0):
                value = message.value()
                if message.error() is None and value is not None:
                    out.append(json.loads(value))
    finally:
        consumer.close()
    return out


def label_summary(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Sustained frames/s and end-to-end percentiles of one run's labels, and where the time
    goes (p50 of each part of the labels' timings, ms)."""
    ok = [r for r in labels if r.get("status", "ok") == "ok"]
    e2e = [r["timings_ms"]["end_to_end"] for r in ok]
    # From the first frame's capture to the last frame's label: the pipeline's own wall time.
    span = (
        (max(r["labeled_at_ns"] for r in labels) - min(r["captured_at_ns"] for r in labels)) / 1e9
        if labels else float("nan")
    )
    return {
        "sustained_fps": round(len(labels) / span, 1) if span and span > 0 else None,
        "p50_ms": percentile(e2e, 50),
        "p95_ms": percentile(e2e, 95),
        "p99_ms": percentile(e2e, 99),
        "max_ms": round(max(e2e), 3) if e2e else None,
        "p50_parts_ms": {
            part: percentile([r["timings_ms"][part] for r in ok if part in r["timings_ms"]], 50)
            for part in ("broker", "queue", "decode", "inference")
        },
    }
