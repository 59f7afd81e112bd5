"""The stream classifier: a Kafka consumer group -> Ray Serve -> labels, latency and DLQ topics.

The commit path, at-least-once (the default):
  1. poll frames; parse each message (Arrow rows or a bare image) into frames, or a DLQ entry;
  2. micro-batch whole messages, bounded by frame count and by wait time;
  3. send each batch to Serve (``classify_frames``), at most ``max_in_flight`` at a time;
  4. complete batches in submission order, so labels keep each stream's order;
  5. produce labels / DLQ records, then - on the commit interval - flush the producer and
     only then commit the offsets. Never the other way round: a crash between 5's flush and
     commit re-labels frames (deduplicable by ``source``), and never loses one.
Exactly-once puts step 5 in a Kafka transaction with the offsets
(``send_offsets_to_transaction``), so ``read_committed`` readers see one label per frame.

Kafka I/O is librdkafka (confluent-kafka): fetching, producing and heartbeats run in its own
threads, outside the interpreter lock, so the Python loop only parses, batches and labels.
Rebalance callbacks run on this loop's thread (inside ``poll``): partitions being revoked
are drained and committed first, so their next owner starts where this member stopped.

When Serve pushes back (``BackPressureError``) or a replica dies mid-request, the consumer
pauses its partitions and retries the same batch with bounded exponential backoff: memory
stays bounded by ``max_in_flight`` batches, and no frame is skipped.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from serving.frames import (
    ARROW_CONTENT_TYPE,
    FrameRecord,
    FrameSchemaError,
    decode_frames,
    warm_up,
)
from streams.client import rdkafka_callbacks, rdkafka_reason
from streams.config import KafkaSettings, TopicSettings
from streams.exceptions import KafkaConnectionError, StreamsError
from streams.labels import encode_label, label_record
from streams.latency import LatencyWindow, encode_latency
from streams.sinks import ParquetSink

log = logging.getLogger(__name__)

Guarantee = Literal["at-least-once", "exactly-once"]
_BARE_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
Partition = tuple[str, int]  # (topic, partition)
MAX_POLL_MESSAGES = 2000
TXN_TIMEOUT_S = 60.0  # one transactional call (send offsets, commit, abort)

FRAMES = Counter(
    "framecast_stream_frames_total", "Frames handled by the stream classifier.", ["outcome"]
)
END_TO_END = Histogram(
    "framecast_stream_end_to_end_ms",
    "Capture to label, per frame (ms).",
    buckets=[1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 5000],
)
# Bound once: a labels() lookup per frame costs as much as the increment.
LABELLED = FRAMES.labels(outcome="labelled")
DROPPED = FRAMES.labels(outcome="dropped_deadline")
LAG = Gauge("framecast_stream_lag", "Consumer lag over the assigned partitions.")
SEND_FAILURES = Counter(
    "framecast_stream_send_failures_total", "Label/DLQ records the brokers never acknowledged."
)
RETRIES = Counter("framecast_stream_serve_retries_total", "Serve calls retried.", ["reason"])


# The DLQ topic takes what the frames topic takes (TopicSettings.max_message_bytes); a DLQ
# record adds headers to the original value, so values are copied up to that less 64 KiB.
DLQ_HEADROOM_BYTES = 64 * 1024


def dlq_value_limit(max_message_bytes: int) -> int:
    """The dlq_max_value_bytes that fits a DLQ topic of this max.message.bytes."""
    return max(1, max_message_bytes - DLQ_HEADROOM_BYTES)


DLQ_MAX_VALUE_BYTES = dlq_value_limit(TopicSettings.model_fields["max_message_bytes"].default)


class ClassifierConfig(BaseModel):
    """How the stream classifier consumes, batches, calls Serve and commits."""

    model_config = ConfigDict(extra="forbid")

    frames_topic: str = Field(default="frames", min_length=1, description="Input frames topic.")
    labels_topic: str = Field(default="labels", min_length=1, description="Labels topic.")
    latency_topic: str = Field(default="latency", min_length=1, description="Aggregates topic.")
    dlq_topic: str = Field(default="frames.dlq", min_length=1, description="Dead-letter topic.")
    group: str = Field(default="framecast", min_length=1, description="Consumer group id.")
    guarantee: Guarantee = Field(default="at-least-once", description="Processing guarantee.")
    deadline_ms: PositiveInt | None = Field(
        default=None, description="Frames older than this (capture to consume) are dropped."
    )
    max_frames: PositiveInt | None = Field(default=None, description="Stop after N frames.")
    consumer_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name in the latency aggregates and transactional id.",
    )
    max_batch_frames: PositiveInt = Field(default=256, description="Frames per Serve call.")
    max_batch_wait_ms: NonNegativeInt = Field(default=10, description="Micro-batch wait.")
    max_in_flight: PositiveInt = Field(default=2, description="Serve calls outstanding at once.")
    commit_interval_ms: NonNegativeInt = Field(default=200, description="Flush+commit cadence.")
    fetch_wait_ms: NonNegativeInt = Field(
        default=10,
        description="Longest a fetch waits at the broker for data (fetch.wait.max.ms); the "
        "client fetches in the background, and a broker answers as soon as any data arrives.",
    )
    label_linger_ms: NonNegativeInt = Field(
        default=10,
        description="Producer linger for labels: fewer, larger produce requests (a commit "
        "flushes at once, so this bounds delivery delay only between commits).",
    )
    latency_window_s: PositiveFloat = Field(default=5.0, description="Aggregate period.")
    serve_timeout_s: PositiveFloat = Field(default=60.0, description="One Serve call's limit.")
    backoff_max_s: PositiveFloat = Field(default=5.0, description="Longest retry backoff.")
    idle_exit_s: PositiveFloat | None = Field(
        default=None, description="Stop after this long without input (tests, batch jobs)."
    )
    parquet_dir: Path | None = Field(default=None, description="Also write Parquet files here.")
    topic_wait_s: PositiveFloat = Field(
        default=60.0, description="How long start-up waits for the frames topic to exist."
    )
    dlq_max_value_bytes: PositiveInt = Field(
        default=DLQ_MAX_VALUE_BYTES,
        description="Largest original value copied into a DLQ record. A larger one is left "
        "out (header error.value_omitted = its size; source.* still point at it): a DLQ "
        "record its topic refuses would block every commit behind it.",
    )


@dataclass
class _Item:
    """One consumed frame (or a message's DLQ entry), in consumption order."""

    topic: str
    partition: int
    offset: int
    row: int
    key: bytes | None
    consumed_ns: int
    broker_ms: float
    frame: FrameRecord | None = None
    dropped: bool = False
    dlq_reason: str | None = None
    dlq_detail: str = ""
    dlq_class: str = ""
    value: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class _Batch:
    items: list[_Item] = field(default_factory=list)
    offsets: dict[Partition, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    response: Any = None
    results: list[dict[str, Any]] | None = None  # the response's answer, once fetched
    submitted_ns: int = 0

    @property
    def frames(self) -> list[FrameRecord]:
        return [
            i.frame
            for i in self.items
            if i.frame is not None and not i.dropped and i.dlq_reason is None
        ]


ClassifyFn = Callable[[list[FrameRecord]], Any]
"""Sends frames to Serve; returns an object whose ``result(timeout_s=...)`` gives the results."""


class StreamClassifier:
    """One member of the classifier consumer group."""

    def __init__(
        self,
        kafka: KafkaSettings,
        bootstrap: str,
        config: ClassifierConfig,
        classify: ClassifyFn,
        retriable: tuple[type[BaseException], ...],
    ) -> None:
        self.config = config
        self.classify = classify
        self.retriable = retriable
        client = {**kafka.rdkafka_config(bootstrap), **rdkafka_callbacks(log)}
        self.exactly_once = config.guarantee == "exactly-once"
        self.consumer = Consumer(
            {
                **client,
                "group.id": config.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": config.fetch_wait_ms,
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
                "fetch.max.bytes": 64 * 1024 * 1024,
                # Notice new partitions (and recover from a missed topic) within 30 s.
                "topic.metadata.refresh.interval.ms": 30_000,
            }
        )
        producer_config: dict[str, Any] = {
            **client,
            "enable.idempotence": True,  # acks=all, no duplicates or reordering on retry
            "linger.ms": config.label_linger_ms,
            "batch.size": 512 * 1024,
            "message.max.bytes": 16 * 1024 * 1024,
            # The same partition per key as the Java client and kafka-python (murmur2).
            "partitioner": "murmur2_random",
            # Only failures call back: a Python call per label would cost more than the send.
            "on_delivery": self._delivered,
            "delivery.report.only.error": True,
        }
        if self.exactly_once:
            producer_config["transactional.id"] = f"framecast-{config.group}-{config.consumer_id}"
        self.producer = Producer(producer_config)
        self.in_txn = False
        # Records the brokers refused since the last commit (delivery reports, or produce()
        # itself): the offsets covering them must not be committed.
        self.send_failures = 0
        self.last_send_failure = ""
        # Exactly-once: the consumer group metadata (its generation) under which the oldest
        # record still held was polled. Offsets are committed with it, so a rebalance since
        # then makes the coordinator refuse them (KIP-447) and the work is redone, not
        # committed twice.
        self.txn_group: Any = None
        self.pending: collections.deque[_Batch] = collections.deque()
        self.batch = _Batch()
        self.done_offsets: dict[Partition, int] = {}
        self.last_commit = time.monotonic()
        self.window = LatencyWindow(config.consumer_id)
        self.sink = (
            ParquetSink(config.parquet_dir, config.consumer_id) if config.parquet_dir else None
        )
        self.stopping = False
        self.closing = False
        self.paused = False
        self.revoking = False
        self.owned: list[TopicPartition] = []  # for other threads: see assignment()
        self.totals = collections.Counter[str](labelled=0, dlq=0, dropped_deadline=0)
        warm_up()  # the first frames are not late for pyarrow's first-use imports
        try:
            self._await_topic_metadata(config.frames_topic, config.topic_wait_s)
            if self.exactly_once:
                self._transactional(self.producer.init_transactions, "init")
        except (StreamsError, KafkaException):
            self.closing = True
            self.consumer.close()
            raise
        self.consumer.subscribe(
            [config.frames_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _await_topic_metadata(self, topic: str, timeout_s: float = 60.0) -> None:
        # The group's assignor only hands out partitions it knows: wait until the topic
        # exists, with a clear error if it never does.
        deadline = time.monotonic() + timeout_s
        why = "it does not exist"
        while True:
            try:
                metadata = self.consumer.list_topics(
                    topic, timeout=max(0.5, min(5.0, deadline - time.monotonic()))
                )
            except KafkaException as error:
                why = rdkafka_reason(error)
                kafka_error = error.args[0] if error.args else None
                if isinstance(kafka_error, KafkaError) and kafka_error.code() in (
                    KafkaError._AUTHENTICATION,
                    KafkaError._TRANSPORT,
                    KafkaError._ALL_BROKERS_DOWN,
                ) and time.monotonic() > deadline:
                    raise KafkaConnectionError(f"cannot consume from Kafka: {why}") from None
            else:
                described = metadata.topics.get(topic)
                if described is not None and described.error is None and described.partitions:
                    return
                if described is not None and described.error is not None:
                    why = described.error.str()
            if time.monotonic() > deadline:
                raise StreamsError(
                    f"frames_topic: topic {topic!r} has no partitions after {timeout_s:g}s "
                    f"({why}; does it exist? create it with `framecast topics create`)"
                )
            time.sleep(0.2)

    # -- public ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to drain, commit and return (safe from a signal handler)."""
        self.stopping = True

    def assignment(self) -> list[TopicPartition]:
        """The partitions this member owns now; safe from any thread (the consumer itself is
        not: a call from another thread waits until the loop's polls let go of it, which on
        a busy loop took up to 25 s)."""
        return list(self.owned)

    def run(self) -> dict[str, Any]:
        """Consume until stop(), max_frames or idle_exit_s; returns the totals."""
        started = time.monotonic()
        last_input = time.monotonic()
        # What exists now (modules, Ray's and the clients' state: ~190k objects) is never
        # garbage: a full collection walking it stalled the loop up to 114 ms, four times in
        # 20 s at 1,000 frames/s. Collected once, then frozen out of later collections.
        gc.collect()
        gc.freeze()
        try:
            while not self.stopping:
                messages = self._poll(self._wait_s())
                if messages:
                    last_input = time.monotonic()
                    for message in messages:
                        self._add(message)
                        if len(self.batch.items) >= self.config.max_batch_frames:
                            # A poll of a backlog can hold 100k frames: cut it into
                            # Serve calls as it is read, so inference overlaps labelling.
                            self._submit_next()
                if self._batch_ready():
                    self._submit_next()
                # Label what Serve has answered, oldest first, without waiting for the rest
                # (_submit_next waits when the in-flight budget is spent): polling goes on
                # meanwhile, so frames do not wait in the broker for a slow Serve call.
                while self.pending and self._answered(self.pending[0]):
                    self._complete(self.pending.popleft())
                self.producer.poll(0)  # delivery reports of failed sends
                self._maybe_commit()
                self._maybe_publish_latency()
                if self.config.max_frames and self._handled() >= self.config.max_frames:
                    break
                if messages:
                    continue
                if not self.consumer.assignment():
                    last_input = time.monotonic()  # idle only counts while we own partitions
                if (
                    self.config.idle_exit_s
                    and not self.pending
                    and not self.batch.items
                    and time.monotonic() - last_input > self.config.idle_exit_s
                ):
                    break
            self.drain(reason="stop")
            self._publish_latency()
        finally:
            self._close()
            gc.unfreeze()
        return {**self.totals, "seconds": round(time.monotonic() - started, 3)}

    def _wait_s(self) -> float:
        """How long the next poll may wait for frames: until the batch being filled is due,
        and only briefly while Serve calls are out (their answers are checked between
        polls); 100 ms when idle."""
        if self.batch.items:
            due = self.batch.started + self.config.max_batch_wait_ms / 1000 - time.monotonic()
            wait = max(0.0, due)
            return min(wait, 0.002) if self.pending else wait
        return 0.002 if self.pending else 0.1

    def _poll(self, wait_s: float) -> list[Message]:
        """The frames waiting in the client, or - if none - the first to arrive within
        ``wait_s`` and what came with it. Rebalance callbacks run in here."""
        try:
            messages = self.consumer.consume(MAX_POLL_MESSAGES, 0)
            if not messages and wait_s > 0:
                first = self.consumer.poll(wait_s)
                if first is not None:
                    messages = [first, *self.consumer.consume(MAX_POLL_MESSAGES - 1, 0)]
        except KafkaException as error:
            kafka_error = error.args[0] if error.args else None
            if isinstance(kafka_error, KafkaError) and kafka_error.fatal():
                raise StreamsError(f"the consumer failed: {rdkafka_reason(error)}") from None
            log.warning("poll failed (%s); retrying", rdkafka_reason(error))
            time.sleep(0.5)
            return []
        return [message for message in messages if self._consumable(message)]

    def _consumable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.fatal():
            raise StreamsError(f"the consumer failed: {error.name()}: {error.str()}")
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("consume: %s: %s", error.name(), error.str())
        return False

    def drain(self, reason: str) -> None:
        """Classify everything held, publish it, and commit (used on stop and on rebalance)."""
        if self.batch.items:
            self._submit(self.batch)
            self.batch = _Batch()
        while self.pending:
            self._complete(self.pending.popleft())
        self._commit(reason)

    # -- rebalance (called inside poll, on this thread) -----------------------------------------
    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.owned = list(partitions)
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish and commit what is held before the partitions go: their next owner then
        starts right after it (no duplicates at-least-once, no aborted work exactly-once)."""
        self.owned = []
        if self.closing or not partitions:
            return
        log.info("revoking %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))
        self.revoking = True
        try:
            self.drain(reason="rebalance")
        finally:
            self.revoking = False
            self.txn_group = None

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a revoke (this member was thrown out of the group):
        what is held can no longer be committed; their new owner redoes it."""
        self.owned = []
        log.warning(
            "lost %s; dropping uncommitted work",
            sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions),
        )
        if self.closing:
            return
        if self.exactly_once and self.in_txn:
            self._abort()
        self._rewind(seek=False)

    # -- consume ----------------------------------------------------------------------------
    def _handled(self) -> int:
        t = self.totals
        return t["labelled"] + t["dropped_deadline"] + t["dlq"]

    def _add(self, message: Message) -> None:
        now = time.time_ns()
        topic, partition = message.topic() or "", message.partition() or 0
        offset = message.offset() or 0
        kind, timestamp = message.timestamp()
        if self.exactly_once and self.txn_group is None:
            self.txn_group = self.consumer.consumer_group_metadata()
        base = {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": message.key(),
            "consumed_ns": now,
            "broker_ms": max(0.0, now / 1e6 - timestamp)
            if kind != TIMESTAMP_NOT_AVAILABLE and timestamp > 0
            else 0.0,
        }
        value = message.value()
        headers = cast(list[tuple[str, bytes]], message.headers() or [])
        for index, item in enumerate(self._parse(value, headers, base)):
            item.row = index
            if (
                item.frame is not None
                and self.config.deadline_ms is not None
                and (now - item.frame.captured_at_ns) / 1e6 > self.config.deadline_ms
            ):
                item.dropped = True
            self.batch.items.append(item)
        self.batch.offsets[(topic, partition)] = offset + 1

    def _parse(
        self, value: bytes | None, headers: list[tuple[str, bytes]], base: dict[str, Any]
    ) -> list[_Item]:
        named = {k: v for k, v in headers}
        content_type = (named.get("content-type") or b"").decode("latin-1")
        content_type = content_type.split(";")[0].strip()

        def dlq(reason: str, detail: str, error_class: str) -> list[_Item]:
            return [
                _Item(
                    **base,
                    row=0,
                    dlq_reason=reason,
                    dlq_detail=detail,
                    dlq_class=error_class,
                    value=value,
                    headers=list(headers),
                )
            ]

        if not value:
            return dlq("empty_value", "the message has no value", "FrameSchemaError")
        if content_type == ARROW_CONTENT_TYPE:
            try:
                frames = decode_frames(value)
            except FrameSchemaError as error:
                return dlq("bad_arrow", str(error), "FrameSchemaError")
            if not frames:
                return dlq("bad_arrow", "Arrow stream holds no frames", "FrameSchemaError")
            # read-only: one list for all of its frames
            return [
                _Item(**base, row=0, frame=frame, value=value, headers=headers)
                for frame in frames
            ]
        encoding = _BARE_TYPES.get(content_type)
        if encoding is None:
            return dlq(
                "unsupported_content_type",
                f"content-type {content_type or '(none)'} is not {ARROW_CONTENT_TYPE}, "
                "image/jpeg or image/png",
                "FrameSchemaError",
            )
        try:
            label = named.get("label")
            stream_id = named.get("stream_id")
            frame = FrameRecord(
                stream_id=(stream_id if stream_id is not None else base["key"] or b"").decode(),
                frame_index=int(named["frame_index"]),
                captured_at_ns=int(named["captured_at_ns"]),
                encoding=encoding,
                height=0,
                width=0,
                channels=0,
                data=value,
                label=int(label) if label not in (None, b"") else None,
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
            return dlq(
                "bad_headers",
                f"bare image needs headers frame_index and captured_at_ns (integers): {error!r}",
                "FrameSchemaError",
            )
        return [_Item(**base, row=0, frame=frame, value=value, headers=list(headers))]

    def _batch_ready(self) -> bool:
        if not self.batch.items:
            return False
        if len(self.batch.items) >= self.config.max_batch_frames:
            return True
        return (time.monotonic() - self.batch.started) * 1000 >= self.config.max_batch_wait_ms

    # -- Serve --------------------------------------------------------------------------------
    def _submit_next(self) -> None:
        """Send the batch being filled, first completing the oldest call if the in-flight
        budget is spent (that is what bounds memory and Serve's queue)."""
        while len(self.pending) >= self.config.max_in_flight:
            self._complete(self.pending.popleft())
        self._submit(self.batch)
        self.batch = _Batch()

    def _submit(self, batch: _Batch) -> None:
        frames = batch.frames
        batch.submitted_ns = time.time_ns()
        batch.response = self.classify(frames) if frames else None
        self.pending.append(batch)

    def _answered(self, batch: _Batch) -> bool:
        """Whether the batch's Serve call has finished, without waiting (a failed call has:
        ``_results`` retries it)."""
        if batch.response is None or batch.results is not None:
            return True
        try:
            batch.results = list(batch.response.result(timeout_s=0))
        except TimeoutError:  # not yet (Ray's GetTimeoutError is a TimeoutError too)
            return False
        except self.retriable:
            return True
        return True

    def _results(self, batch: _Batch) -> list[dict[str, Any]]:
        if batch.response is None:
            return []
        delay = 0.05
        while True:
            try:
                results = (
                    batch.results
                    if batch.results is not None
                    else batch.response.result(timeout_s=self.config.serve_timeout_s)
                )
                if self.paused:
                    self.consumer.resume(self.consumer.assignment())
                    self.paused = False
                return list(results)
            except self.retriable as error:
                # Backpressure or a lost replica: hold the input, retry the same frames.
                RETRIES.labels(reason=type(error).__name__).inc()
                log.warning(
                    "Serve call failed (%s: %s); retrying in %.2fs",
                    type(error).__name__,
                    str(error)[:200],
                    delay,
                )
                if not self.paused:
                    self.consumer.pause(self.consumer.assignment())
                    self.paused = True
                time.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)
                batch.submitted_ns = time.time_ns()
                batch.results = None
                batch.response = self.classify(batch.frames)

    def _complete(self, batch: _Batch) -> None:
        results = iter(self._results(batch))
        done_ns = time.time_ns()
        self._begin()
        dlq_sent: set[tuple[int, int]] = set()
        labelled, dropped = self.totals["labelled"], self.totals["dropped_deadline"]
        for item in batch.items:
            if item.dlq_reason is None and not item.dropped:
                result = next(results)
                if "error" in result:
                    item.dlq_reason, item.dlq_detail = result["error"], result["detail"]
                    item.dlq_class = "FrameDecodeError"
            if item.dlq_reason is not None:
                if (item.partition, item.offset) not in dlq_sent:  # one DLQ record per message
                    dlq_sent.add((item.partition, item.offset))
                    self._send_dlq(item)
                continue
            self._send_label(item, None if item.dropped else result, batch, done_ns)
        # Counted once per batch: a Prometheus increment takes a lock, per frame it showed.
        if self.totals["labelled"] > labelled:
            LABELLED.inc(self.totals["labelled"] - labelled)
        if self.totals["dropped_deadline"] > dropped:
            DROPPED.inc(self.totals["dropped_deadline"] - dropped)
        for tp, offset in batch.offsets.items():
            self.done_offsets[tp] = max(offset, self.done_offsets.get(tp, 0))

    # -- produce ------------------------------------------------------------------------------
    def _begin(self) -> None:
        if self.exactly_once and not self.in_txn:
            self._transactional(self.producer.begin_transaction, "begin")
            self.in_txn = True

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:  # only failures are reported (delivery.report.only.error)
            self._failed(message.topic() or "?", f"{error.name()}: {error.str()}")

    def _failed(self, topic: str, why: str) -> None:
        self.send_failures += 1
        self.last_send_failure = f"{topic}: {why}"

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=cast(Any, headers))
                return
            except BufferError:  # the client's queue is full: let deliveries drain it
                self.producer.poll(0.05)
            except KafkaException as error:  # refused before sending (e.g. too large)
                self._failed(topic, rdkafka_reason(error))
                return

    def _send_label(
        self, item: _Item, result: dict[str, Any] | None, batch: _Batch, done_ns: int
    ) -> None:
        frame = item.frame
        assert frame is not None  # noqa: S101 - only frames reach here
        labeled_ns = time.time_ns()
        timings = {
            "broker": round(item.broker_ms, 3),
            "queue": round(max(0, batch.submitted_ns - item.consumed_ns) / 1e6, 3),
            "inference": round(result["inference_ms"], 3) if result else 0.0,
            "end_to_end": round((labeled_ns - frame.captured_at_ns) / 1e6, 3),
        }
        record = label_record(
            stream_id=frame.stream_id,
            frame_index=frame.frame_index,
            topic=item.topic,
            partition=item.partition,
            offset=item.offset,
            row=item.row,
            result=result,
            captured_at_ns=frame.captured_at_ns,
            labeled_at_ns=labeled_ns,
            timings_ms=timings,
            ground_truth=frame.label,
        )
        self._produce(self.config.labels_topic, frame.stream_id.encode(), encode_label(record))
        if self.sink:
            self.sink.add_label(record)
        if result is None:
            self.totals["dropped_deadline"] += 1
            self.window.dropped += 1
        else:
            self.totals["labelled"] += 1
            if frame.label is not None:
                self.totals["with_ground_truth"] += 1
                self.totals["correct"] += int(result["class_id"] == frame.label)
            self.window.latencies_ms.append(timings["end_to_end"])
            END_TO_END.observe(timings["end_to_end"])

    def _send_dlq(self, item: _Item) -> None:
        headers = [(k, v) for k, v in item.headers if not k.startswith(("error.", "source."))]
        headers += [
            ("error.reason", item.dlq_reason.encode() if item.dlq_reason else b""),
            ("error.class", item.dlq_class.encode()),
            ("error.detail", item.dlq_detail[:1000].encode()),
            ("source.topic", item.topic.encode()),
            ("source.partition", str(item.partition).encode()),
            ("source.offset", str(item.offset).encode()),
        ]
        value = item.value or b""
        if len(value) > self.config.dlq_max_value_bytes:
            headers.append(("error.value_omitted", str(len(value)).encode()))
            value = b""
        self._produce(self.config.dlq_topic, item.key, value, headers)
        self.totals["dlq"] += 1
        self.window.dlq += 1
        FRAMES.labels(outcome="dlq").inc()
        log.info("DLQ %s[%d]@%d: %s", item.topic, item.partition, item.offset, item.dlq_reason)

    # -- commit ----------------------------------------------------------------------------
    def _maybe_commit(self) -> None:
        if (time.monotonic() - self.last_commit) * 1000 >= self.config.commit_interval_ms:
            self._commit("interval")

    def _commit(self, reason: str) -> None:
        self.last_commit = time.monotonic()
        if not self.done_offsets:
            return
        if self.exactly_once:
            self._commit_transaction(reason)
            return
        # 1. flush: every label/DLQ record is acknowledged by the brokers (acks=all) ...
        left = self.producer.flush(60)
        if left:
            # Still unconfirmed (brokers away): the offsets wait for the next commit.
            log.warning("%d label/DLQ records unacknowledged after 60 s; commit (%s) waits",
                        left, reason)
            return
        if self.send_failures:
            # Not delivered (e.g. refused, or the brokers were away past message.timeout.ms):
            # these offsets must not be committed; read them again instead.
            log.error(
                "%d label/DLQ records were not delivered (%s); not committing, "
                "re-reading from the committed offsets",
                self.send_failures,
                self.last_send_failure,
            )
            SEND_FAILURES.inc(self.send_failures)
            self.send_failures = 0
            self._rewind(seek=not self.revoking)
            return
        # 2. ... and only then the offsets: a crash in between re-labels, never loses.
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.done_offsets.items()]
        self.done_offsets.clear()
        try:
            for committed in self.consumer.commit(offsets=offsets, asynchronous=False) or []:
                if committed.error is not None:
                    log.warning("commit (%s) of %s[%d] failed: %s; that work will be redone",
                                reason, committed.topic, committed.partition, committed.error)
        except KafkaException as error:
            # Typically a rebalance took partitions away (the group generation moved on).
            log.warning("commit (%s) failed: %s; uncommitted work will be redone",
                        reason, rdkafka_reason(error))
            return
        log.debug("committed (%s)", reason)

    def _commit_transaction(self, reason: str) -> None:
        """Offsets join the open transaction, then its commit makes labels and offsets
        visible at once - or, on failure, it is aborted and the work redone."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.done_offsets.items()]
        self.done_offsets.clear()
        try:
            self._begin()
            if self.send_failures:
                raise _Abort(f"{self.send_failures} records refused ({self.last_send_failure})")
            group = self.txn_group or self.consumer.consumer_group_metadata()
            self._transactional(
                lambda: self.producer.send_offsets_to_transaction(offsets, group, TXN_TIMEOUT_S),
                "send offsets",
            )
            self._transactional(
                lambda: self.producer.commit_transaction(TXN_TIMEOUT_S), "commit"
            )
            self.in_txn = False
        except (KafkaException, _Abort) as error:
            why = rdkafka_reason(error) if isinstance(error, KafkaException) else str(error)
            log.warning("transaction (%s) failed: %s; aborted, its work will be redone",
                        reason, why)
            if self.send_failures:
                SEND_FAILURES.inc(self.send_failures)
            self._abort()
            self._rewind(seek=not self.revoking)
            return
        if not self.pending and not self.batch.items:
            self.txn_group = None  # nothing polled under it is held any more
        log.debug("committed transaction (%s)", reason)

    def _transactional(self, call: Callable[[], Any], what: str) -> Any:
        """A transactional producer call: retried while librdkafka says it may be, fatal
        errors (this producer was fenced by a newer one with its transactional id) stop the
        classifier; others raise for the caller to abort."""
        for attempt in range(3):
            try:
                return call()
            except KafkaException as error:
                kafka_error = error.args[0] if error.args else None
                if not isinstance(kafka_error, KafkaError):
                    raise
                if kafka_error.fatal():
                    raise StreamsError(
                        f"the transactional producer failed ({what}): "
                        f"{rdkafka_reason(error)}; another classifier with consumer id "
                        f"{self.config.consumer_id!r} may have replaced this one"
                    ) from None
                if not kafka_error.retriable() or attempt == 2:
                    raise
                log.warning("transaction %s: %s; retrying", what, rdkafka_reason(error))
        return None  # not reached

    def _abort(self) -> None:
        self.send_failures = 0
        if not self.in_txn:
            return
        try:
            self._transactional(lambda: self.producer.abort_transaction(TXN_TIMEOUT_S), "abort")
        except KafkaException as error:
            log.warning("abort failed: %s", rdkafka_reason(error))
        self.in_txn = False

    def _rewind(self, *, seek: bool = True) -> None:
        """After an aborted transaction or an undelivered label: drop the work in hand and
        (when the partitions stay ours) re-read them from their committed offsets."""
        self.txn_group = None
        self.send_failures = 0
        for batch in self.pending:  # results of aborted work would be produced out of a txn
            batch.response = None
            batch.items.clear()
        self.pending.clear()
        self.batch = _Batch()
        self.done_offsets.clear()
        assignment = self.consumer.assignment()
        if not seek or not assignment:
            return
        try:
            for tp in self.consumer.committed(assignment, timeout=30):
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        except KafkaException as error:
            # Reading on past uncommitted frames could commit over them: leave the group
            # and join again instead, which restarts every partition at its committed offset.
            log.warning("seek to the committed offsets failed (%s); re-joining the group",
                        rdkafka_reason(error))
            self.consumer.unsubscribe()
            self.consumer.subscribe(
                [self.config.frames_topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )

    # -- latency aggregates ------------------------------------------------------------------
    def _maybe_publish_latency(self) -> None:
        if self.window.elapsed() >= self.config.latency_window_s:
            self._publish_latency()

    def _lag(self) -> int | None:
        """Frames behind the partitions' ends (the ends the last fetches reported)."""
        assignment = self.consumer.assignment()
        if not assignment:
            LAG.set(0)
            return 0
        try:
            lag = 0
            for tp in self.consumer.position(assignment):
                watermarks = self.consumer.get_watermark_offsets(tp, cached=True)
                if not watermarks or watermarks[1] < 0:
                    return None  # not fetched yet
                low, high = watermarks
                lag += max(0, high - (tp.offset if tp.offset >= 0 else low))
        except KafkaException:
            return None
        LAG.set(lag)
        return lag

    def _publish_latency(self) -> None:
        record = self.window.snapshot(self._lag())
        self.window.reset()
        try:
            self._begin()
        except KafkaException as error:
            log.warning("latency aggregate not published: %s", rdkafka_reason(error))
            return
        self._produce(
            self.config.latency_topic, self.config.consumer_id.encode(), encode_latency(record)
        )
        if self.exactly_once:
            if self.done_offsets:
                # Labels of this transaction whose offsets are not committed yet: committing
                # them alone would make them visible while their frames stay uncommitted, and
                # the next owner of those partitions (after a rebalance) would label them
                # again. They commit together with their offsets, or not at all.
                self._commit("latency")
            else:
                try:
                    self._transactional(
                        lambda: self.producer.commit_transaction(TXN_TIMEOUT_S), "commit"
                    )
                    self.in_txn = False
                except KafkaException as error:
                    log.warning("latency transaction failed: %s", rdkafka_reason(error))
                    self._abort()
                    self._rewind(seek=not self.revoking)
        if self.sink:
            self.sink.add_latency(record)
        self.totals["latency_windows"] += 1

    def _close(self) -> None:
        self.closing = True
        try:
            if self.exactly_once and self.in_txn:
                self._abort()  # uncommitted work is redone by the next owner
            left = self.producer.flush(30)
            if left:
                log.warning("%d records still unacknowledged at close", left)
        finally:
            self.consumer.close()
            if self.sink:
                self.sink.close()


class _Abort(Exception):
    """A transaction that must not be committed."""

