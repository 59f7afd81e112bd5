"""Kafka consumers that feed the dashboard's state: labels, latency, DLQ, sampled frames, lag.

The dashboard reads as a group of its own (``dashboard.group``), apart from the classifier's:
it never joins that group and never commits, so it cannot take partitions or offsets from the
pipeline it watches. Each consumer is assigned every partition of its topics (two dashboards
both see everything) from a little before the end (``backlog`` records a partition, so the
page fills at once) or, with ``from_beginning``, from the first offset. Topics that do not
exist yet (a deployment that has not started) are looked for again every few seconds.

Three threads, each with its own client:

1. records: the labels, latency and DLQ topics (small JSON records and headers);
2. frames: the frames topic, of which one frame a camera per ``frame_interval_s`` is decoded
   (a message whose key names a camera not due for a picture is skipped undecoded);
3. offsets: every ``lag_interval_s``, the classifier group's committed offsets against the
   frames topic's end offsets (lag per partition), the DLQ topic's size, this process's CPU
   and, when a Serve URL is given, the model Serve reports at ``/healthz``.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from cluster.dashboard.state import DashboardState, DeadLetter, PartitionLag
from streams.client import KafkaAdmin, group_free_consumer, rdkafka_reason
from streams.config import KafkaSettings
from streams.exceptions import StreamsError
from streams.parsing import ParseLimits, Source, kafka_timestamp_ns, parse_message

log = logging.getLogger(__name__)
# As in streams/classifier.py: through methodcaller, a header key that is not UTF-8 raises
# here (confluent-kafka 2.16 sets the error without raising on a specialized call site).
_read_headers = operator.methodcaller("headers")


def _headers(message: Message) -> tuple[list[tuple[str, bytes | None]] | None, str | None]:
    """A message's headers, or None and why they cannot be read."""
    try:
        return cast(list[tuple[str, bytes | None]] | None, _read_headers(message)), None
    except (SystemError, ValueError) as error:
        return None, f"{type(error).__name__}: {error.__cause__ or error}"


@dataclass(frozen=True, slots=True)
class FeedTopics:
    """The topics the page shows (the settings' ``topics`` section by default)."""

    frames: str
    labels: str
    latency: str
    dlq: str


def _camera(key: bytes) -> str:
    return key.decode("utf-8", errors="replace")


class _Assignment:
    """Keeps one consumer assigned to every partition of its topics, new ones included."""

    def __init__(
        self,
        consumer: Consumer,
        backlog: dict[str, int | None],
        state: DashboardState,
        timeout_s: float,
    ) -> None:
        self.consumer = consumer
        self.backlog = backlog  # topic -> records a partition to start before the end; None: all
        self.state = state
        self.timeout_s = timeout_s
        self.assigned: set[tuple[str, int]] = set()
        self.checked_at = 0.0

    def refresh(self, every_s: float = 5.0) -> None:
        """Assign partitions not assigned yet (at most every ``every_s``)."""
        if time.monotonic() - self.checked_at < every_s:
            return
        self.checked_at = time.monotonic()
        new = []
        for topic, backlog in self.backlog.items():
            try:
                found = self.consumer.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
            except KafkaException as error:
                log.warning("dashboard: cannot read the metadata of %s: %s", topic,
                            rdkafka_reason(error))
                continue
            missing = found is None or found.error is not None or not found.partitions
            with self.state.lock:
                if missing:
                    self.state.waiting_for.add(topic)
                else:
                    self.state.waiting_for.discard(topic)
            if missing or found is None:
                continue
            for partition in sorted(found.partitions):
                if (topic, partition) in self.assigned:
                    continue
                start = OFFSET_BEGINNING
                if backlog is not None:
                    low, high = self.consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=self.timeout_s
                    )
                    start = max(low, high - backlog)
                new.append(TopicPartition(topic, partition, start))
        if new:
            self.consumer.incremental_assign(new)
            self.assigned.update((tp.topic, tp.partition) for tp in new)


class DashboardFeed:
    """The dashboard's Kafka side: :meth:`start` its threads, :meth:`stop` them."""

    def __init__(
        self,
        kafka: KafkaSettings,
        bootstrap: str,
        topics: FeedTopics,
        state: DashboardState,
        *,
        group: str,
        classifier_group: str,
        backlog: int = 1000,
        from_beginning: bool = False,
        lag_interval_s: float = 2.0,
        serve_url: str | None = None,
    ) -> None:
        self.kafka = kafka
        self.bootstrap = bootstrap
        self.topics = topics
        self.state = state
        self.group = group
        self.classifier_group = classifier_group
        self.lag_interval_s = lag_interval_s
        self.serve_url = serve_url.rstrip("/") if serve_url else None
        self.timeout_s = kafka.request_timeout_ms / 1000

        def start(records: int) -> int | None:
            return None if from_beginning else records

        self.record_backlog = {
            topics.labels: start(backlog), topics.latency: start(200), topics.dlq: start(50)
        }
        self.frame_backlog = {topics.frames: start(64)}
        self.limits = ParseLimits()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._guard, args=(self._records,), name="dashboard-records",
                             daemon=True),
            threading.Thread(target=self._guard, args=(self._frames,), name="dashboard-frames",
                             daemon=True),
            threading.Thread(target=self._guard, args=(self._offsets,), name="dashboard-offsets",
                             daemon=True),
        ]

    def start(self) -> DashboardFeed:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stopping.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout_s)

    def _consumer(self, **properties: Any) -> Consumer:
        return group_free_consumer(
            self.kafka, self.bootstrap, log, **{"group.id": self.group, **properties}
        )

    def _guard(self, loop: Callable[[], None]) -> None:
        # A feed thread that dies would freeze part of the page without a word: log it, and
        # start the loop again after a pause (a new client, so a broken one is not reused).
        while not self.stopping.is_set():
            try:
                loop()
                return
            except Exception:
                log.exception("dashboard: %s failed; starting it again in 5 s",
                              threading.current_thread().name)
                self.stopping.wait(5.0)

    # -- 1. labels, latency, DLQ -----------------------------------------------------------
    def _records(self) -> None:
        consumer = self._consumer()
        assignment = _Assignment(consumer, self.record_backlog, self.state, self.timeout_s)
        try:
            while not self.stopping.is_set():
                assignment.refresh()
                messages = consumer.consume(num_messages=1000, timeout=0.2)
                if messages:
                    self._apply_records(messages)
        finally:
            consumer.close()

    def _apply_records(self, messages: list[Message]) -> None:
        labels, aggregates, letters = [], [], []
        bad = 0
        for message in messages:
            if message.error() is not None:
                continue  # librdkafka retries by itself and logs what it could not do
            topic = message.topic()
            if topic == self.topics.dlq:
                headers, _error = _headers(message)
                kind, stamp = message.timestamp()
                letters.append(DeadLetter.from_headers(
                    message.partition() or 0, message.offset() or 0,
                    stamp if kafka_timestamp_ns(kind, stamp) else None, message.key(),
                    headers or [],
                ))
                continue
            try:
                record = orjson.loads(message.value() or b"")
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict):
                bad += 1
            elif topic == self.topics.labels:
                labels.append(record)
            elif topic == self.topics.latency:
                aggregates.append(record)
        with self.state.lock:
            self.state.bad_records += bad
            for record in labels:
                self.state.add_label(record)
            for record in aggregates:
                self.state.add_latency(record)
            for letter in letters:
                self.state.add_dead_letter(letter)

    # -- 2. frames, sampled ----------------------------------------------------------------
    def _frames(self) -> None:
        # A bounded local queue: the frames topic is the heavy one, and the page wants only
        # its latest frames.
        consumer = self._consumer(**{"queued.max.messages.kbytes": 16 * 1024})
        assignment = _Assignment(consumer, self.frame_backlog, self.state, self.timeout_s)
        # A camera's latest message while it is not due for a picture (by key): decoded once
        # it is due, so that a camera's last frame is pictured even when no other follows.
        pending: dict[bytes, Message] = {}
        try:
            while not self.stopping.is_set():
                assignment.refresh()
                for message in consumer.consume(num_messages=500, timeout=0.2):
                    if message.error() is None:
                        self._sample(message, pending)
                if pending:
                    now_ns = time.time_ns()
                    with self.state.lock:
                        due = [k for k in pending if self.state.wants_frame(_camera(k), now_ns)]
                    for key in due:
                        self._decode(pending.pop(key))
        finally:
            consumer.close()

    def _sample(self, message: Message, pending: dict[bytes, Message]) -> None:
        key = message.key()
        if key:
            with self.state.lock:
                due = self.state.wants_frame(_camera(key), time.time_ns())
            if not due:
                if key in pending or len(pending) < self.state.max_cameras:
                    pending[key] = message
                return
            pending.pop(key, None)
        self._decode(message)

    def _decode(self, message: Message) -> None:
        now_ns = time.time_ns()
        key = message.key()
        headers, headers_error = _headers(message)
        kind, stamp = message.timestamp()
        source = Source(
            message.topic() or "", message.partition() or 0, message.offset() or 0, key,
            now_ns, kafka_timestamp_ns(kind, stamp),
        )
        items = parse_message(message.value(), headers, source, self.limits,
                              headers_error=headers_error)
        frames = [item.frame for item in items if item.frame is not None and item.reason is None]
        if frames:
            with self.state.lock:
                for frame in frames:
                    if self.state.wants_frame(frame.stream_id, now_ns):
                        self.state.add_frame(frame, now_ns)

    # -- 3. offsets, lag, this process, Serve ----------------------------------------------
    def _offsets(self) -> None:
        admin = KafkaAdmin(self.kafka, self.bootstrap)
        offsets = self._consumer()
        me = psutil.Process()
        cpu_before, wall_before = sum(me.cpu_times()[:2]), time.monotonic()
        serve_checked = 0.0
        try:
            while not self.stopping.wait(self.lag_interval_s):
                self._measure_lag(admin, offsets)
                cpu, wall = sum(me.cpu_times()[:2]), time.monotonic()
                process = {
                    "cpu_percent": round(100 * (cpu - cpu_before) / max(wall - wall_before, 1e-3),
                                         2),
                    "rss_mb": round(me.memory_info().rss / 2**20, 1),
                }
                cpu_before, wall_before = cpu, wall
                with self.state.lock:
                    self.state.process = process
                if self.serve_url and time.monotonic() - serve_checked > 5:
                    serve_checked = time.monotonic()
                    serve = self._serve_health()
                    with self.state.lock:
                        self.state.serve = serve
        finally:
            offsets.close()

    def _measure_lag(self, admin: KafkaAdmin, offsets: Consumer) -> None:
        try:
            committed = admin.committed_offsets(self.classifier_group)
            rows = []
            for topic in (self.topics.frames, self.topics.dlq):
                found = offsets.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
                if found is None or found.error is not None:
                    continue
                for partition in sorted(found.partitions):
                    low, high = offsets.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=self.timeout_s
                    )
                    rows.append((topic, partition, low, high))
        except (KafkaException, StreamsError) as error:
            reason = rdkafka_reason(error) if isinstance(error, KafkaException) else str(error)
            with self.state.lock:
                self.state.lag_error = reason[:300]
            return
        lags = []
        for topic, partition, _low, high in rows:
            if topic == self.topics.frames:
                offset = committed.get((topic, partition), -1)  # < 0: nothing committed
                lags.append(PartitionLag(topic, partition, offset if offset >= 0 else None, high))
        with self.state.lock:
            self.state.set_partitions(self.classifier_group, lags)
            self.state.dlq_in_topic = sum(
                high - low for topic, _p, low, high in rows if topic == self.topics.dlq
            )

    def _serve_health(self) -> dict[str, Any]:
        import httpx

        url = f"{self.serve_url}/healthz"
        try:
            answer = httpx.get(url, timeout=2.0)
            body = answer.json()
        except (httpx.HTTPError, ValueError) as error:
            return {"url": self.serve_url, "status": "unreachable", "detail": str(error)[:200]}
        if not isinstance(body, dict):
            return {"url": self.serve_url, "status": f"HTTP {answer.status_code}"}
        return {
            "url": self.serve_url,
            "status": body.get("status", f"HTTP {answer.status_code}"),
            "model": body.get("model"),
            "input": body.get("input"),
        }
