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

When Serve pushes back (``BackPressureError``) or a replica dies mid-request, the consumer
pauses its partitions and retries the same batch with bounded exponential backoff: memory
stays bounded by ``max_in_flight`` batches, and no frame is skipped.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from serving.frames import ARROW_CONTENT_TYPE, FrameRecord, FrameSchemaError, decode_frames
from streams.client import KeyHashCachingPartitioner
from streams.config import KafkaSettings, TopicSettings
from streams.exceptions import StreamsError
from streams.labels import encode_label, label_record
from streams.latency import LatencyWindow, encode_latency
from streams.sinks import ParquetSink

log = logging.getLogger(__name__)

Guarantee = Literal["at-least-once", "exactly-once"]
_BARE_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}

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
        description="Longest a fetch waits at the broker for data. The client sends one fetch "
        "at a time and leaves out partitions it still holds records of, so a fetch of only "
        "idle partitions holds back new frames on the others for up to this long.",
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
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
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


class _Revoke(ConsumerRebalanceListener):
    def __init__(self, owner: StreamClassifier) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # kafka-python 3 calls this on its IO thread, where blocking consumer calls (commit)
        # are refused, so nothing is finished here. The main loop's next commit for a
        # partition we lost then fails and is dropped: its new owner redoes that work from
        # the committed offset (at-least-once: duplicates, never a loss; exactly-once: the
        # transaction aborts and nothing of it becomes visible).
        self.owner.revoked.update(revoked)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


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
        client = kafka.client_config(bootstrap)
        self.exactly_once = config.guarantee == "exactly-once"
        self.consumer = KafkaConsumer(
            **client,
            group_id=config.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=2000,
            fetch_max_wait_ms=config.fetch_wait_ms,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            # Notice new partitions (and recover from a missed topic) within 30 s, not 5 min.
            metadata_max_age_ms=30_000,
        )
        producer_extra: dict[str, Any] = {}
        if self.exactly_once:
            producer_extra["transactional_id"] = f"framecast-{config.group}-{config.consumer_id}"
        self.producer = KafkaProducer(
            **client,
            acks="all",
            enable_idempotence=True,
            linger_ms=config.label_linger_ms,
            batch_size=512 * 1024,
            max_request_size=16 * 1024 * 1024,
            partitioner=KeyHashCachingPartitioner(),
            **producer_extra,
        )
        if self.exactly_once:
            self.producer.init_transactions()
        self.in_txn = False
        self.revoked: set[TopicPartition] = set()
        # Label and DLQ sends since the last commit: a flush only waits for them, so each is
        # checked for failure before offsets covering it are committed (at-least-once).
        self.sent: list[Any] = []
        # Exactly-once: the group membership (generation) under which the oldest record still
        # held was polled. Offsets are committed with it, so a rebalance since then makes the
        # coordinator refuse them (KIP-447) and the work is redone, not committed twice.
        self.txn_group: Any = None
        self.pending: collections.deque[_Batch] = collections.deque()
        self.batch = _Batch()
        self.done_offsets: dict[TopicPartition, int] = {}
        self.last_commit = time.monotonic()
        self.window = LatencyWindow(config.consumer_id)
        self.sink = (
            ParquetSink(config.parquet_dir, config.consumer_id) if config.parquet_dir else None
        )
        self.stopping = False
        self.paused = False
        self.totals = collections.Counter[str](labelled=0, dlq=0, dropped_deadline=0)
        try:
            self._await_topic_metadata(config.frames_topic, config.topic_wait_s)
        except StreamsError:
            self.producer.close(timeout=5)
            self.consumer.close(autocommit=False)
            raise
        self.consumer.subscribe([config.frames_topic], listener=_Revoke(self))
        # One metadata fetch after subscribing, before the first poll joins the group: the
        # group leader records the subscribed topics' partitions as its assignment snapshot
        # at the join, and a snapshot still empty then makes the next metadata refresh force
        # a second rebalance right after the first (kafka-python 3.0.12 could then stall
        # with no partitions fetched).
        self.consumer.topics()

    def _await_topic_metadata(self, topic: str, timeout_s: float = 60.0) -> None:
        # The group's assignor only hands out partitions it knows; joining before this
        # client has the topic's metadata can leave us with no partitions until the next
        # metadata refresh. So fetch it first.
        deadline = time.monotonic() + timeout_s
        while not self.consumer.partitions_for_topic(topic):
            if time.monotonic() > deadline:
                raise StreamsError(
                    f"frames_topic: topic {topic!r} has no partitions after {timeout_s:g}s "
                    "(does it exist? create it with `framecast topics create`)"
                )
            time.sleep(0.2)

    # -- public ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to drain, commit and return (safe from a signal handler)."""
        self.stopping = True

    def run(self) -> dict[str, Any]:
        """Consume until stop(), max_frames or idle_exit_s; returns the totals."""
        started = time.monotonic()
        last_input = time.monotonic()
        try:
            while not self.stopping:
                busy = self.batch.items or self.pending
                wait_ms = max(1, self.config.max_batch_wait_ms) if busy else 100
                if self.exactly_once and self.txn_group is None:
                    self._hold_group_generation()
                records = self._poll(wait_ms)
                if records and self.exactly_once and self.txn_group is None:
                    self._hold_group_generation()  # joined during this very poll
                if records:
                    last_input = time.monotonic()
                    for tp, messages in records.items():
                        for message in messages:
                            self._add(tp, message)
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
                self._maybe_commit()
                self._maybe_publish_latency()
                if self.config.max_frames and self._handled() >= self.config.max_frames:
                    break
                if not self.consumer.assignment():
                    last_input = time.monotonic()  # idle only counts while we own partitions
                if (
                    self.config.idle_exit_s
                    and not records
                    and not self.pending
                    and not self.batch.items
                    and time.monotonic() - last_input > self.config.idle_exit_s
                ):
                    break
            self.drain(reason="stop")
            self._publish_latency()
        finally:
            self._close()
        return {**self.totals, "seconds": round(time.monotonic() - started, 3)}

    def _poll(self, wait_ms: int) -> dict[TopicPartition, list[Any]]:
        """consumer.poll, riding out a broker that is down or restarting.

        kafka-python raises a retriable error out of poll() when its coordinator lookup
        finds no broker (connection refused mid-restart). Nothing was consumed then, so
        the same poll is simply tried again after a short pause; held work stays held.
        """
        try:
            return dict(self.consumer.poll(timeout_ms=wait_ms, max_records=2000))
        except KafkaError as error:
            if not getattr(error, "retriable", False):
                raise
            log.warning("poll failed (%s: %s); retrying", type(error).__name__, error)
            time.sleep(0.5)
            return {}

    def drain(self, reason: str) -> None:
        """Classify everything held, publish it, and commit (used on stop and on rebalance)."""
        if self.batch.items:
            self._submit(self.batch)
            self.batch = _Batch()
        while self.pending:
            self._complete(self.pending.popleft())
        self._commit(reason)

    # -- consume ----------------------------------------------------------------------------
    def _handled(self) -> int:
        t = self.totals
        return t["labelled"] + t["dropped_deadline"] + t["dlq"]

    def _add(self, tp: TopicPartition, message: Any) -> None:
        now = time.time_ns()
        base = {
            "topic": tp.topic,
            "partition": tp.partition,
            "offset": message.offset,
            "key": message.key,
            "consumed_ns": now,
            "broker_ms": max(0.0, now / 1e6 - message.timestamp) if message.timestamp else 0.0,
        }
        for index, item in enumerate(self._parse(message, base)):
            item.row = index
            if (
                item.frame is not None
                and self.config.deadline_ms is not None
                and (now - item.frame.captured_at_ns) / 1e6 > self.config.deadline_ms
            ):
                item.dropped = True
            self.batch.items.append(item)
        self.batch.offsets[tp] = message.offset + 1

    def _parse(self, message: Any, base: dict[str, Any]) -> list[_Item]:
        headers = {k: v for k, v in (message.headers or [])}
        content_type = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip()

        def dlq(reason: str, detail: str, error_class: str) -> list[_Item]:
            return [
                _Item(
                    **base,
                    row=0,
                    dlq_reason=reason,
                    dlq_detail=detail,
                    dlq_class=error_class,
                    value=message.value,
                    headers=list(message.headers or []),
                )
            ]

        if not message.value:
            return dlq("empty_value", "the message has no value", "FrameSchemaError")
        if content_type == ARROW_CONTENT_TYPE:
            try:
                frames = decode_frames(message.value)
            except FrameSchemaError as error:
                return dlq("bad_arrow", str(error), "FrameSchemaError")
            if not frames:
                return dlq("bad_arrow", "Arrow stream holds no frames", "FrameSchemaError")
            shared = list(message.headers or [])  # read-only: one list for all of its frames
            return [
                _Item(**base, row=0, frame=frame, value=message.value, headers=shared)
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
            label = headers.get("label")
            frame = FrameRecord(
                stream_id=headers["stream_id"].decode()
                if "stream_id" in headers
                else (message.key or b"").decode(),
                frame_index=int(headers["frame_index"]),
                captured_at_ns=int(headers["captured_at_ns"]),
                encoding=encoding,
                height=0,
                width=0,
                channels=0,
                data=message.value,
                label=int(label) if label not in (None, b"") else None,
            )
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            return dlq(
                "bad_headers",
                f"bare image needs headers frame_index and captured_at_ns (integers): {error!r}",
                "FrameSchemaError",
            )
        return [
            _Item(
                **base, row=0, frame=frame, value=message.value, headers=list(message.headers or [])
            )
        ]

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
                    self.consumer.resume(*self.consumer.assignment())
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
                    self.consumer.pause(*self.consumer.assignment())
                    self.paused = True
                time.sleep(delay)
                delay = min(delay * 2, self.config.backoff_max_s)
                batch.submitted_ns = time.time_ns()
                batch.results = None
                batch.response = self.classify(batch.frames)

    def _complete(self, batch: _Batch) -> None:
        results = iter(self._results(batch))
        done_ns = time.time_ns()
        if self.exactly_once and not self.in_txn:
            self.producer.begin_transaction()
            self.in_txn = True
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
        self.sent.append(
            self.producer.send(
                self.config.labels_topic, key=frame.stream_id.encode(), value=encode_label(record)
            )
        )
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
        self.sent.append(
            self.producer.send(self.config.dlq_topic, key=item.key, value=value, headers=headers)
        )
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
        from kafka.structs import OffsetAndMetadata

        offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in self.done_offsets.items()}
        self.done_offsets.clear()
        sent, self.sent = self.sent, []
        try:
            if self.exactly_once:
                if not self.in_txn:
                    self.producer.begin_transaction()
                    self.in_txn = True
                # 1. offsets join the transaction; 2. commit makes labels and offsets visible
                # at once.
                group = self.txn_group or self.consumer.group_metadata()
                self.producer.send_offsets_to_transaction(offsets, group)
                self.producer.commit_transaction()
                self.in_txn = False
                if not self.pending and not self.batch.items:
                    self.txn_group = None  # nothing polled under it is held any more
            else:
                # 1. flush: every label/DLQ record is acknowledged by the brokers (acks=all) ...
                self.producer.flush(timeout=60)
                failed = [future for future in sent if future.failed()]
                if failed:
                    # Not delivered (e.g. the brokers were away past delivery.timeout.ms):
                    # these offsets must not be committed; read them again instead.
                    log.error(
                        "%d label/DLQ records were not delivered (%s); not committing, "
                        "re-reading from the committed offsets",
                        len(failed),
                        failed[0].exception,
                    )
                    SEND_FAILURES.inc(len(failed))
                    self._rewind()
                    return
                # 2. ... and only then the offsets: a crash in between re-labels, never loses.
                self.consumer.commit(offsets)
        except KafkaError as error:
            # Typically a rebalance took partitions away (the group generation moved on).
            log.warning("commit (%s) failed: %s; uncommitted work will be redone", reason, error)
            if self.exactly_once:
                if self.in_txn:
                    self.producer.abort_transaction()
                    self.in_txn = False
                self._rewind()
            else:
                # Still unconfirmed (a flush timeout): checked again at the next commit, whose
                # offsets cover these records too.
                self.sent = [future for future in sent if not future.is_done] + self.sent
                if any(future.failed() for future in sent):
                    SEND_FAILURES.inc()
                    self._rewind()
            return
        finally:
            self.revoked.clear()
        log.debug("committed (%s)", reason)

    def _hold_group_generation(self) -> None:
        group = self.consumer.group_metadata()
        if getattr(group, "generation_id", -1) > 0:  # -1 (not joined) would skip the check
            self.txn_group = group

    def _rewind(self) -> None:
        """After an aborted transaction or an undelivered label: re-read owned partitions from
        their committed offsets (work in hand is dropped and redone)."""
        self.txn_group = None
        for batch in self.pending:  # results of aborted work would be produced out of a txn
            batch.response = None
            batch.items.clear()
        self.pending.clear()
        self.batch = _Batch()
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)

    # -- latency aggregates ------------------------------------------------------------------
    def _maybe_publish_latency(self) -> None:
        if self.window.elapsed() >= self.config.latency_window_s:
            self._publish_latency()

    def _lag(self) -> int | None:
        assignment = list(self.consumer.assignment())
        if not assignment:
            return 0
        try:
            ends = self.consumer.end_offsets(assignment)
            lag = sum(max(0, ends[tp] - self.consumer.position(tp)) for tp in assignment)
        except KafkaError:
            return None
        LAG.set(lag)
        return lag

    def _publish_latency(self) -> None:
        record = self.window.snapshot(self._lag())
        self.window.reset()
        if self.exactly_once and not self.in_txn:
            self.producer.begin_transaction()
            self.in_txn = True
        self.producer.send(
            self.config.latency_topic,
            key=self.config.consumer_id.encode(),
            value=encode_latency(record),
        )
        if self.exactly_once:
            if self.done_offsets:
                # Labels of this transaction whose offsets are not committed yet: committing
                # them alone would make them visible while their frames stay uncommitted, and
                # the next owner of those partitions (after a rebalance) would label them
                # again. They commit together with their offsets, or not at all.
                self._commit("latency")
            else:
                self.producer.commit_transaction()
                self.in_txn = False
        if self.sink:
            self.sink.add_latency(record)
        self.totals["latency_windows"] += 1

    def _close(self) -> None:
        if self.exactly_once and self.in_txn:
            self.producer.abort_transaction()  # uncommitted work is redone by the next owner
        self.producer.close(timeout=30)
        self.consumer.close(autocommit=False)
        if self.sink:
            self.sink.close()
