"""Micro-batches: consumed items grouped into Serve calls, bounded by frames, bytes and time.

A batch is cut when it holds ``max_frames`` frames or ``max_bytes`` of frame data, or when
its oldest item has waited ``max_wait_ms``; the classifier also cuts it at once whenever
no Serve call is out (waiting then only adds latency). A message of many rows may be cut
across batches: its offset is recorded on the batch that holds its last row, and batches
complete in the order they were cut, so an offset is committed only once every row before it
is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from serving.frames import FrameRecord
from serving.results import FrameAnswer
from streams.parsing import Item

Partition = tuple[str, int]  # (topic, partition)


@dataclass
class Batch:
    """Items on their way through one Serve call, and the offsets they complete."""

    items: list[Item] = field(default_factory=list)
    offsets: dict[Partition, int] = field(default_factory=dict)  # next offset to read
    started: float = field(default_factory=time.monotonic)
    frame_count: int = 0
    frame_bytes: int = 0
    response: Any = None  # the Serve call in flight (``result(timeout_s=...)``)
    results: list[FrameAnswer] | None = None  # its answers, once fetched
    submitted_ns: int = 0
    attempts: int = 0

    @property
    def frames(self) -> list[FrameRecord]:
        """The frames this batch sends to Serve, in item order."""
        return [i.frame for i in self.items if i.classifiable]  # type: ignore[misc]


class Batcher:
    """Fills the current batch and says when it is due."""

    def __init__(self, max_frames: int, max_bytes: int, max_wait_ms: float) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.max_wait_s = max_wait_ms / 1000
        self.current = Batch()

    def add(self, items: list[Item], partition: Partition, next_offset: int) -> list[Batch]:
        """Add one message's items; returns the batches that became full on the way."""
        full = []
        if not self.current.items and not self.current.offsets:
            self.current.started = time.monotonic()  # its wait starts with its first item
        for item in items:
            if item.classifiable:
                size = len(item.frame.data)  # type: ignore[union-attr]
                if self.current.frame_count and (
                    self.current.frame_count >= self.max_frames
                    or self.current.frame_bytes + size > self.max_bytes
                ):
                    full.append(self.cut())
                self.current.frame_count += 1
                self.current.frame_bytes += size
            self.current.items.append(item)
        self.current.offsets[partition] = next_offset
        current = self.current
        if current.frame_count >= self.max_frames or current.frame_bytes >= self.max_bytes:
            full.append(self.cut())
        return full

    def cut(self) -> Batch:
        """The current batch, replaced by an empty one."""
        batch, self.current = self.current, Batch()
        return batch

    def holding(self) -> bool:
        """Whether the current batch holds any item or offset."""
        return bool(self.current.items or self.current.offsets)

    def due(self, now: float | None = None) -> bool:
        """Whether the current batch holds anything and has waited long enough."""
        if not self.current.items and not self.current.offsets:
            return False
        now = time.monotonic() if now is None else now
        return now - self.current.started >= self.max_wait_s

    def wait_s(self, now: float | None = None) -> float | None:
        """Seconds until the current batch is due (None when it is empty)."""
        if not self.current.items and not self.current.offsets:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self.current.started + self.max_wait_s - now)

    def clear(self) -> None:
        """Drop what is held (its offsets are not done)."""
        self.current = Batch()
