"""The latency aggregate (DESIGN contract): what each consumer publishes every few seconds."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict


class LatencyRecord(BaseModel):
    """One window of one consumer, as readers of the latency topic see it."""

    model_config = ConfigDict(extra="forbid")

    consumer: str
    window_s: float
    frames: int
    fps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    dropped_deadline: int
    dlq: int
    lag: int | None
    at_ns: int


class LatencyWindow:
    """Collects end-to-end latencies and counts until the window is published."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.started = time.monotonic()
        self.latencies_ms: list[float] = []
        self.dropped = 0
        self.dlq = 0

    def elapsed(self) -> float:
        """Seconds since the window started."""
        return time.monotonic() - self.started

    def snapshot(self, lag: int | None) -> dict[str, Any]:
        """The aggregate of this window (percentiles are None when no frame was labelled)."""
        window = max(self.elapsed(), 1e-9)
        values = np.asarray(self.latencies_ms, dtype=np.float64)
        has = values.size > 0

        def pct(q: float) -> float | None:
            return round(float(np.percentile(values, q)), 3) if has else None

        return {
            "consumer": self.consumer,
            "window_s": round(window, 3),
            "frames": int(values.size),
            "fps": round(values.size / window, 2),
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "max_ms": round(float(values.max()), 3) if has else None,
            "dropped_deadline": self.dropped,
            "dlq": self.dlq,
            "lag": lag,
            "at_ns": time.time_ns(),
        }


def encode_latency(record: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON for the wire."""
    return json.dumps(record, separators=(",", ":")).encode()
