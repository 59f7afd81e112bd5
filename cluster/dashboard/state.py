"""The aggregation behind the dashboard page: pure, no I/O and no clock of its own.

The feed (:mod:`cluster.dashboard.feed`) hands it what it reads from Kafka: labels, latency
aggregates, dead letters, sampled frames and the classifier group's offsets; the app asks it
for a :meth:`DashboardState.snapshot`, the JSON the page draws. Times come with the records
(``labeled_at_ns``, ``at_ns``) or from the caller (``now_ns``), so tests replay any history.

End-to-end latencies are kept per second as histograms over log-spaced bins (2.3 % wide):
p50/p99 of any window is a sum of a few arrays, whatever the frame rate, and memory is
bounded by ``history_s``, not by frames.
"""

from __future__ import annotations

import bisect
import collections
import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.frames import FrameRecord

# Latency bins: 800 log-spaced edges from 10 us to 1000 s; a value is reported as the
# geometric middle of its bin, at most 1.2 % from the truth.
_LOW_MS, _HIGH_MS, _BINS = 1e-2, 1e6, 800
EDGES_MS: list[float] = list(np.geomspace(_LOW_MS, _HIGH_MS, _BINS + 1))
_MIDDLES_MS = np.sqrt(np.asarray(EDGES_MS[:-1]) * np.asarray(EDGES_MS[1:]))
RELATIVE_ERROR = float(math.sqrt(EDGES_MS[1] / EDGES_MS[0]) - 1)


def latency_bin(ms: float) -> int:
    """The histogram bin of a latency (values out of range go to the first or last bin)."""
    return min(_BINS - 1, max(0, bisect.bisect_right(EDGES_MS, ms) - 1))


def percentile(histogram: np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile (0..100) of a latency histogram (None when it is empty)."""
    total = int(histogram.sum())
    if total == 0:
        return None
    rank = max(1, math.ceil(q / 100 * total))  # nearest rank
    index = int(np.searchsorted(np.cumsum(histogram), rank))
    return round(float(_MIDDLES_MS[index]), 3)


def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``cam-2`` before ``cam-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(slots=True)
class Picture:
    """A camera's latest sampled frame, and the label of that frame once it is known."""

    seq: int  # changes with every new picture: the page fetches /frame/<id>?v=<seq>
    frame: FrameRecord
    label: str | None = None
    score: float | None = None


@dataclass(slots=True)
class Camera:
    """What the page shows of one camera (``stream_id``)."""

    stream_id: str
    labelled: int = 0
    dropped: int = 0
    correct: int = 0
    with_truth: int = 0
    frame_index: int | None = None
    label: str | None = None
    class_id: int | None = None
    score: float | None = None
    status: str | None = None
    end_to_end_ms: float | None = None
    labeled_at_ns: int = 0
    ground_truth: int | None = None
    # frame_index -> (label, score) of its recent labels: a sampled frame finds its label
    recent: collections.OrderedDict[int, tuple[str | None, float | None]] = field(
        default_factory=collections.OrderedDict
    )
    picture: Picture | None = None
    sampled_at_ns: int = 0

    def row(self) -> dict[str, Any]:
        picture = self.picture
        return {
            "id": self.stream_id,
            "labelled": self.labelled,
            "dropped": self.dropped,
            "frame_index": self.frame_index,
            "label": self.label,
            "class_id": self.class_id,
            "score": None if self.score is None else round(self.score, 4),
            "status": self.status,
            "e2e_ms": self.end_to_end_ms,
            "labeled_at_ms": self.labeled_at_ns // 1_000_000,
            "ground_truth": self.ground_truth,
            "accuracy": self.correct / self.with_truth if self.with_truth else None,
            "picture": None
            if picture is None
            else {
                "seq": picture.seq,
                "frame_index": picture.frame.frame_index,
                "label": picture.label,
                "score": None if picture.score is None else round(picture.score, 4),
            },
        }


@dataclass(slots=True)
class _Second:
    """Labels of one second (by ``labeled_at_ns``)."""

    labelled: int = 0
    dropped: int = 0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, dtype=np.int64))
    quantiles: tuple[float | None, float | None] | None = None  # p50, p99; None: recompute

    def p50_p99(self) -> tuple[float | None, float | None]:
        if self.quantiles is None:
            self.quantiles = (percentile(self.histogram, 50), percentile(self.histogram, 99))
        return self.quantiles


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the DLQ topic, as the page lists it."""

    partition: int
    offset: int
    timestamp_ms: int | None
    reason: str
    error_class: str
    detail: str
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    source_row: int | None
    key: str | None

    @classmethod
    def from_headers(
        cls,
        partition: int,
        offset: int,
        timestamp_ms: int | None,
        key: bytes | None,
        headers: Iterable[tuple[str, bytes | None]],
    ) -> DeadLetter:
        """From a DLQ record's headers (``error.*``, ``source.*``); missing ones are None."""
        named = {k: (v or b"").decode("utf-8", errors="replace") for k, v in headers}

        def number(name: str) -> int | None:
            text = named.get(name, "")
            return int(text) if text.lstrip("-").isdigit() and len(text) < 20 else None

        return cls(
            partition=partition,
            offset=offset,
            timestamp_ms=timestamp_ms,
            reason=named.get("error.reason", "")[:100] or "(none)",
            error_class=named.get("error.class", "")[:100],
            detail=named.get("error.detail", "")[:300],
            source_topic=named.get("source.topic", "")[:250] or None,
            source_partition=number("source.partition"),
            source_offset=number("source.offset"),
            source_row=number("source.row"),
            key=key[:120].decode("utf-8", errors="replace") if key else None,
        )


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition of the frames topic: the classifier group's committed offset, the end."""

    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here
    end: int

    @property
    def lag(self) -> int | None:
        return None if self.committed is None else max(0, self.end - self.committed)


class DashboardState:
    """Everything the page shows, updated record by record.

    Not thread-safe by itself: the feed threads and the app hold :attr:`lock` around each use.
    """

    def __init__(
        self,
        *,
        history_s: int = 300,
        window_s: int = 60,
        dead_letters_kept: int = 20,
        max_cameras: int = 4096,
        frame_interval_s: float = 1.0,
    ) -> None:
        self.lock = threading.Lock()
        self.history_s = history_s
        self.window_s = window_s
        self.max_cameras = max_cameras
        self.frame_interval_ns = int(frame_interval_s * 1e9)
        self.cameras: dict[str, Camera] = {}
        self.cameras_refused = 0  # labels of cameras past max_cameras (counted, not shown)
        self.seconds: dict[int, _Second] = {}
        self.latest_second = 0
        self.labelled = 0
        self.dropped = 0
        self.correct = 0
        self.with_truth = 0
        self.bad_records = 0
        self.model: dict[str, Any] | None = None
        self.models_seen: dict[str, int] = {}  # "name version" -> labels
        self.consumers: dict[str, collections.deque[dict[str, Any]]] = {}
        self.dead_letters: collections.deque[DeadLetter] = collections.deque(
            maxlen=dead_letters_kept
        )
        self.dlq_total = 0
        self.dlq_reasons: collections.Counter[str] = collections.Counter()
        self.partitions: list[PartitionLag] = []
        self.lag_group: str | None = None
        self.lag_error: str | None = None
        self.serve: dict[str, Any] | None = None
        self.dlq_in_topic: int | None = None  # records the DLQ topic holds (end - start)
        self.waiting_for: set[str] = set()  # topics that do not exist (yet)
        self.process: dict[str, Any] = {}  # the dashboard's own CPU and memory
        self._pictures = 0

    # -- the labels topic ------------------------------------------------------------------
    def add_label(self, record: dict[str, Any]) -> None:
        """One label (streams/labels.py); a record without its fields counts as bad."""
        try:
            stream_id = str(record["stream_id"])
            frame_index = int(record["frame_index"])
            labeled_at_ns = int(record["labeled_at_ns"])
            status = str(record.get("status", "ok"))
            end_to_end = (record.get("timings_ms") or {}).get("end_to_end")
        except (KeyError, TypeError, ValueError, AttributeError):
            self.bad_records += 1
            return
        camera = self._camera(stream_id)
        second = self._second(labeled_at_ns // 1_000_000_000)
        if status == "ok":
            self.labelled += 1
            if second is not None:
                second.labelled += 1
                if isinstance(end_to_end, int | float):
                    second.histogram[latency_bin(float(end_to_end))] += 1
                    second.quantiles = None
            model = record.get("model")
            if isinstance(model, dict):
                self.model = model
                name = f"{model.get('name')} {model.get('version')}"
                self.models_seen[name] = self.models_seen.get(name, 0) + 1
        else:
            self.dropped += 1
            if second is not None:
                second.dropped += 1
        truth, class_id = record.get("ground_truth"), record.get("class_id")
        has_truth = truth is not None and status == "ok"
        if has_truth:
            self.with_truth += 1
            self.correct += int(class_id == truth)
        if camera is None:
            return
        if status == "ok":
            camera.labelled += 1
        else:
            camera.dropped += 1
        if has_truth:
            camera.with_truth += 1
            camera.correct += int(class_id == truth)
        label, score = record.get("label"), record.get("score")
        camera.frame_index = frame_index
        camera.label = label
        camera.class_id = class_id
        camera.score = score
        camera.status = status
        camera.end_to_end_ms = end_to_end
        camera.labeled_at_ns = labeled_at_ns
        camera.ground_truth = truth
        camera.recent[frame_index] = (label, score)
        if len(camera.recent) > 64:
            camera.recent.popitem(last=False)
        picture = camera.picture
        if picture is not None and picture.frame.frame_index == frame_index:
            picture.label, picture.score = label, score

    def _camera(self, stream_id: str) -> Camera | None:
        camera = self.cameras.get(stream_id)
        if camera is None:
            if len(self.cameras) >= self.max_cameras:
                self.cameras_refused += 1
                return None
            camera = self.cameras[stream_id] = Camera(stream_id)
        return camera

    def _second(self, second: int) -> _Second | None:
        if second <= self.latest_second - self.history_s:
            return None  # older than the charts: counted in the totals only
        bucket = self.seconds.get(second)
        if bucket is None:
            bucket = self.seconds[second] = _Second()
            if second > self.latest_second:
                self.latest_second = second
                horizon = second - self.history_s
                for old in [s for s in self.seconds if s <= horizon]:
                    del self.seconds[old]
        return bucket

    # -- frames, sampled -------------------------------------------------------------------
    def wants_frame(self, stream_id: str, now_ns: int) -> bool:
        """Whether a frame of this camera should be kept now (one per frame_interval_s)."""
        camera = self.cameras.get(stream_id)
        if camera is None:
            return len(self.cameras) < self.max_cameras
        return now_ns - camera.sampled_at_ns >= self.frame_interval_ns

    def add_frame(self, frame: FrameRecord, now_ns: int) -> None:
        """Keep ``frame`` as its camera's picture (with its label, if already read)."""
        camera = self._camera(frame.stream_id)
        if camera is None:
            return
        self._pictures += 1
        label, score = camera.recent.get(frame.frame_index, (None, None))
        camera.picture = Picture(self._pictures, frame, label, score)
        camera.sampled_at_ns = now_ns

    def picture(self, stream_id: str) -> Picture | None:
        """The latest sampled frame of a camera."""
        camera = self.cameras.get(stream_id)
        return camera.picture if camera is not None else None

    # -- the latency topic -----------------------------------------------------------------
    def add_latency(self, record: dict[str, Any]) -> None:
        """One consumer's aggregate (streams/latency.py)."""
        try:
            consumer = str(record["consumer"])
            at_ns = int(record["at_ns"])
        except (KeyError, TypeError, ValueError):
            self.bad_records += 1
            return
        keep = {
            key: record.get(key)
            for key in ("frames", "fps", "p50_ms", "p99_ms", "dropped_deadline", "dlq", "lag")
        }
        keep["at_ns"] = at_ns
        history = self.consumers.setdefault(consumer, collections.deque(maxlen=2000))
        history.append(keep)
        horizon = at_ns - self.history_s * 1_000_000_000
        while history and history[0]["at_ns"] < horizon:
            history.popleft()

    # -- the DLQ topic, the group's offsets, Serve -----------------------------------------
    def add_dead_letter(self, letter: DeadLetter) -> None:
        self.dlq_total += 1
        self.dlq_reasons[letter.reason] += 1
        self.dead_letters.appendleft(letter)

    def set_partitions(self, group: str, partitions: list[PartitionLag]) -> None:
        self.lag_group, self.partitions, self.lag_error = group, partitions, None

    # -- what the page draws ---------------------------------------------------------------
    def window(self, now_ns: int, seconds: int) -> dict[str, Any]:
        """Labels of the last ``seconds`` whole seconds before ``now_ns``: frames, rate,
        deadline drops, p50/p99 end-to-end latency."""
        now_s = now_ns // 1_000_000_000
        chosen = [self.seconds[s] for s in range(now_s - seconds, now_s) if s in self.seconds]
        histogram = sum((b.histogram for b in chosen), np.zeros(_BINS, dtype=np.int64))
        frames = sum(b.labelled for b in chosen)
        # A rate over the seconds since the first label, when that is less than the window
        # (the page was just opened on a stream that just started).
        first = min(self.seconds, default=now_s)
        span = max(1, min(seconds, now_s - first))
        return {
            "seconds": seconds,
            "frames": frames,
            "fps": round(frames / span, 2),
            "dropped": sum(b.dropped for b in chosen),
            "p50_ms": percentile(histogram, 50),
            "p99_ms": percentile(histogram, 99),
        }

    def series(self, now_ns: int) -> dict[str, Any]:
        """Per-second charts over ``history_s``: total throughput and p50/p99 from the
        labels, and each consumer's fps/p99/lag from its aggregates at their seconds."""
        now_s = now_ns // 1_000_000_000
        # From a little before the first label when that is within the history, so that a
        # stream that just started fills the chart rather than a sliver at its right end.
        first = min(self.seconds, default=now_s) - 10
        grid = list(range(max(now_s - self.history_s, min(first, now_s - 60)), now_s))
        fps: list[int | None] = []
        p50: list[float | None] = []
        p99: list[float | None] = []
        dropped: list[int | None] = []
        for s in grid:
            bucket = self.seconds.get(s)
            fps.append(bucket.labelled if bucket else 0)
            dropped.append(bucket.dropped if bucket else 0)
            low, high = bucket.p50_p99() if bucket else (None, None)
            p50.append(low)
            p99.append(high)
        consumers = {}
        start = grid[0] if grid else now_s
        for name, history in sorted(self.consumers.items()):
            columns: dict[str, list[Any]] = {k: [None] * len(grid) for k in ("fps", "p99", "lag")}
            for record in history:
                i = record["at_ns"] // 1_000_000_000 - start
                if 0 <= i < len(grid):
                    columns["fps"][i] = record["fps"]
                    columns["p99"][i] = record["p99_ms"]
                    columns["lag"][i] = record["lag"]
            consumers[name] = columns
        return {"t": grid, "fps": fps, "p50": p50, "p99": p99, "dropped": dropped,
                "consumers": consumers}

    def snapshot(self, now_ns: int) -> dict[str, Any]:
        """The JSON the page draws, as of ``now_ns``."""
        stale_ns = now_ns - 3 * 60 * 1_000_000_000
        consumers = []
        for name, history in sorted(self.consumers.items()):
            if not history:
                continue
            last = history[-1]
            consumers.append({
                "consumer": name,
                **{k: v for k, v in last.items() if k != "at_ns"},
                "at_ms": last["at_ns"] // 1_000_000,
                "stale": last["at_ns"] < stale_ns,
                "dropped_total": sum(r["dropped_deadline"] or 0 for r in history),
                "dlq_total": sum(r["dlq"] or 0 for r in history),
            })
        cameras = sorted(self.cameras.values(), key=lambda c: natural_key(c.stream_id))
        lags = [p.lag for p in self.partitions if p.lag is not None]
        return {
            "now_ms": now_ns // 1_000_000,
            "totals": {
                "labelled": self.labelled,
                "dropped": self.dropped,
                "cameras": len(self.cameras),
                "cameras_refused": self.cameras_refused,
                "accuracy": self.correct / self.with_truth if self.with_truth else None,
                "with_truth": self.with_truth,
                "bad_records": self.bad_records,
            },
            "window": self.window(now_ns, self.window_s),
            "series": self.series(now_ns),
            "model": self.model,
            "models_seen": self.models_seen,
            "serve": self.serve,
            "consumers": consumers,
            "lag": {
                "group": self.lag_group,
                "error": self.lag_error,
                "total": sum(lags) if lags else None,
                "partitions": [
                    {"topic": p.topic, "partition": p.partition, "committed": p.committed,
                     "end": p.end, "lag": p.lag}
                    for p in self.partitions
                ],
            },
            "dlq": {
                "total": self.dlq_total,
                "in_topic": self.dlq_in_topic,
                "reasons": dict(self.dlq_reasons.most_common()),
                "latest": [
                    {
                        "partition": d.partition, "offset": d.offset,
                        "timestamp_ms": d.timestamp_ms, "reason": d.reason,
                        "class": d.error_class, "detail": d.detail,
                        "source": None if d.source_topic is None else {
                            "topic": d.source_topic, "partition": d.source_partition,
                            "offset": d.source_offset, "row": d.source_row,
                        },
                        "key": d.key,
                    }
                    for d in self.dead_letters
                ],
            },
            "cameras": [c.row() for c in cameras],
            "waiting_for": sorted(self.waiting_for),
            "process": self.process,
        }
