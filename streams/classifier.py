"""The stream classifier: a Kafka consumer group -> Ray Serve -> labels, latency and DLQ topics.

One member of the group runs :meth:`StreamClassifier.run`, a short loop that hands off:
  1. poll messages; :func:`streams.parsing.parse_message` turns each into frames or dead
     letters (a pure function: no message can make it raise);
  2. :class:`streams.batching.Batcher` groups frames into Serve calls, bounded by frames,
     bytes and wait time;
  3. each batch goes to Serve (``classify_frames``), at most ``max_in_flight`` at a time;
  4. batches complete in submission order (each stream's labels keep its order):
     :class:`streams.output.Output` produces labels and dead letters;
  5. on the commit interval :class:`streams.checkpoint.Checkpoint` commits - after the
     labels are acknowledged, or in a Kafka transaction with them (exactly-once).

Kafka I/O is librdkafka (confluent-kafka): fetching, producing and heartbeats run in its own
threads, outside the interpreter lock. Rebalance callbacks run on this loop's thread (inside
``poll``): partitions being revoked are drained and committed first, so their next owner
starts where this member stopped.

Serve failures are :mod:`streams.serve_calls`'s: retried while Serve has no replica for us
(for at most ``serve_give_up_s``), and isolated down to the one frame that breaks a replica
(``replica_error`` in the DLQ). While it waits, the member pauses its partitions and polls,
so it stays in its group. Memory stays bounded by ``max_in_flight`` batches, and no frame is
skipped.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import operator
import time
from typing import Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import Counter, Gauge, Histogram

from serving.frames import FrameRecord, warm_up
from serving.results import ClassifyResult, FrameAnswer, FrameError
from streams.batching import Batch, Batcher
from streams.checkpoint import SEND_FAILURES, Checkpoint, Outcome
from streams.client import rdkafka_callbacks, rdkafka_reason
from streams.config import ClassifierConfig, Guarantee, KafkaSettings, dlq_value_limit
from streams.exceptions import KafkaConnectionError, StreamsError
from streams.latency import LatencyWindow
from streams.output import Output
from streams.parsing import ParseLimits, Source, kafka_timestamp_ns, parse_message
from streams.serve_calls import ClassifyFn, Interrupted, ServeCalls
from streams.sinks import ParquetSink

__all__ = [
    "SEND_FAILURES",
    "ClassifierConfig",
    "ClassifyFn",
    "Guarantee",
    "StreamClassifier",
    "dlq_value_limit",
]

log = logging.getLogger(__name__)

MAX_POLL_MESSAGES = 2000

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
DEAD = FRAMES.labels(outcome="dlq")
LAG = Gauge("framecast_stream_lag", "Consumer lag over the assigned partitions.")
# Message.headers() through a C-level call: confluent-kafka 2.16 returns a list *with an
# exception set* for a header key that is not UTF-8. A hot call site of the method is
# specialized by the interpreter and skips the check that turns this into an error, which
# then surfaced at a later, unrelated call (a SystemError that stopped the loop);
# methodcaller's call makes the check, so the error is raised here.
_read_headers = operator.methodcaller("headers")


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
        self.serve = ServeCalls(
            classify,
            retriable,
            timeout_s=config.serve_timeout_s,
            max_attempts=config.serve_max_attempts,
            give_up_s=config.serve_give_up_s,
            backoff_max_s=config.backoff_max_s,
            keep_alive=self._keep_alive,
            answered=self._resume,
        )
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
            # A labels topic deleted and created again is seen within 10 s (the default, 5
            # minutes, kept labels queued for a topic that existed again long before), and a
            # record that cannot be delivered fails within 60 s: the work is then redone.
            "topic.metadata.refresh.interval.ms": 10_000,
            "message.timeout.ms": 60_000,
            # Only failures call back: a Python call per label would cost more than the send.
            "on_delivery": self._delivered,
            "delivery.report.only.error": True,
        }
        if self.exactly_once:
            producer_config["transactional.id"] = f"framecast-{config.group}-{config.consumer_id}"
        self.output = Output(
            Producer(producer_config),
            labels_topic=config.labels_topic,
            dlq_topic=config.dlq_topic,
            latency_topic=config.latency_topic,
            dlq_max_value_bytes=config.dlq_max_value_bytes,
            transactional=self.exactly_once,
        )
        self.checkpoint = Checkpoint(
            self.consumer,
            self.output,
            exactly_once=self.exactly_once,
            interval_ms=config.commit_interval_ms,
        )
        self.limits = ParseLimits(
            max_message_frames=config.max_message_frames,
            max_decoded_bytes=config.max_message_decoded_bytes,
            max_frame_bytes=config.max_frame_bytes,
            max_stream_id_bytes=config.max_stream_id_bytes,
            max_clock_skew_ms=config.max_clock_skew_ms,
            max_capture_delay_s=config.max_capture_delay_s,
        )
        self.batcher = Batcher(
            config.max_batch_frames, config.max_batch_bytes, config.max_batch_wait_ms
        )
        self.pending: collections.deque[Batch] = collections.deque()
        self.window = LatencyWindow(config.consumer_id)
        self.sink = (
            ParquetSink(config.parquet_dir, config.consumer_id) if config.parquet_dir else None
        )
        self.stopping = False
        self.closing = False
        self.paused = False
        self.revoking = False
        self.waiting = False  # inside a Serve call's wait (rebalances then abandon the work)
        self.epoch = 0  # bumped when the work in hand is dropped
        self.redo_delay = 0.0
        self.owned: list[TopicPartition] = []  # for other threads: see assignment()
        self.totals = collections.Counter[str](labelled=0, dlq=0, dropped_deadline=0)
        self.uncommitted = collections.Counter[str]()  # of the totals, since the last commit
        warm_up()  # the first frames are not late for pyarrow's first-use imports
        try:
            self._await_topic_metadata(config.frames_topic, config.topic_wait_s)
            if self.exactly_once:
                self.output.transactional_call(self.output.producer.init_transactions, "init")
        except (StreamsError, KafkaException):
            self.closing = True
            self.consumer.close()
            raise
        self._subscribe()

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        self.output.delivered(error, message)

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            [self.config.frames_topic],
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
        not: a call from another thread waits until the loop's polls let go of it)."""
        return list(self.owned)

    def run(self) -> dict[str, Any]:
        """Consume until stop(), max_frames or idle_exit_s; returns the totals."""
        started = last_input = time.monotonic()
        # What exists now (modules, Ray's and the clients' state) is never garbage: full
        # collections walking it stalled the loop (see docs/BENCHMARKS.md). Collected once,
        # then frozen out of later collections.
        gc.collect()
        gc.freeze()
        try:
            while not self.stopping:
                messages = self._poll(self._wait_s())
                if messages:
                    last_input = time.monotonic()
                with contextlib.suppress(Interrupted):
                    self._step(messages)
                if self.config.max_frames and self._handled() >= self.config.max_frames:
                    break
                if messages:
                    continue
                if not self.owned:
                    last_input = time.monotonic()  # idle only counts while we own partitions
                if (
                    self.config.idle_exit_s
                    and not self.pending
                    and not self.batcher.current.items
                    and time.monotonic() - last_input > self.config.idle_exit_s
                ):
                    break
            self.drain(reason="stop")
            self._publish_latency()
        finally:
            self._close()
            gc.unfreeze()
        return {**self.totals, "seconds": round(time.monotonic() - started, 3)}

    def _step(self, messages: list[Message]) -> None:
        """One turn of the loop after a poll."""
        for message in messages:
            for batch in self._consume(message):
                # A poll of a backlog can hold 100k frames: cut it into Serve calls as it
                # is read, so inference overlaps labelling.
                self._submit(batch)
        # Label what Serve has answered, oldest first, without waiting for the rest:
        # polling goes on meanwhile, so frames do not wait in the broker for a slow call.
        while self.pending and self.serve.done(self.pending[0]):
            self._complete(self.pending.popleft())
        # A batch waits for more frames only while Serve is busy: with no call out, waiting
        # would add its whole wait to every frame's latency and save nothing. Under load the
        # frames that arrive during one call become the next call's batch.
        if self.batcher.due() or (not self.pending and self.batcher.holding()):
            self._submit(self.batcher.cut())
        self.output.poll()  # delivery reports of failed sends
        if self.checkpoint.due():
            self._commit("interval")
        if self.window.elapsed() >= self.config.latency_window_s:
            self._publish_latency()

    def _wait_s(self) -> float:
        """How long the next poll may wait for frames: until the batch being filled is due,
        and only briefly while Serve calls are out (their answers are checked between
        polls); 100 ms when idle."""
        due = self.batcher.wait_s()
        if due is not None:
            return min(due, 0.002) if self.pending else due
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
        try:
            if self.batcher.current.items or self.batcher.current.offsets:
                self._submit(self.batcher.cut(), wait=False)
            while self.pending:
                self._complete(self.pending.popleft())
        except Interrupted:
            return
        self._commit(reason)

    # -- rebalance (called inside poll, on this thread) -----------------------------------------
    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.owned = list(partitions)
        self.paused = False  # a new assignment starts unpaused
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish and commit what is held before the partitions go: their next owner then
        starts right after it (no duplicates at-least-once, no aborted work exactly-once)."""
        self.owned = []
        if self.closing or not partitions:
            return
        log.info("revoking %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))
        if self.waiting:
            # Inside a Serve call's wait (Serve is away): the work cannot be finished now;
            # the next owner redoes it.
            log.warning("revoked while waiting for Serve; the work in hand is redone elsewhere")
            self.output.abort()
            self._rewind(seek=False)
            return
        self.revoking = True
        try:
            self.drain(reason="rebalance")
        finally:
            self.revoking = False
            self.checkpoint.txn_group = None

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
        self.output.abort()
        self._rewind(seek=False)

    # -- consume ----------------------------------------------------------------------------
    def _handled(self) -> int:
        t = self.totals
        return t["labelled"] + t["dropped_deadline"] + t["dlq"]

    def _consume(self, message: Message) -> list[Batch]:
        """Parse one message into the batcher; returns the batches it filled."""
        now = time.time_ns()
        topic, partition = message.topic() or "", message.partition() or 0
        offset = message.offset() or 0
        kind, timestamp_ms = message.timestamp()
        self.checkpoint.polled()
        source = Source(
            topic, partition, offset, message.key(), now, kafka_timestamp_ns(kind, timestamp_ms)
        )
        headers: Any = None
        headers_error: str | None = None
        try:
            headers = _read_headers(message)
        except (SystemError, ValueError) as error:  # confluent-kafka: a key that is not UTF-8
            headers_error = f"{type(error).__name__}: {error.__cause__ or error}"
        items = parse_message(
            message.value(),
            cast(list[tuple[str, bytes | None]] | None, headers),
            source,
            self.limits,
            self.config.deadline_ms,
            headers_error,
        )
        if self.output.learned:
            for item in items:
                if item.reason is None and self.output.route(item) == "dlq":
                    item.reason, item.error_class = "label_refused", "LabelRefused"
                    item.detail = f"topic {self.config.labels_topic} refused this frame's label"
        return self.batcher.add(items, (topic, partition), offset + 1)

    # -- Serve --------------------------------------------------------------------------------
    def _submit(self, batch: Batch, wait: bool = True) -> None:
        """Send a batch, first completing the oldest call if the in-flight budget is spent
        (that is what bounds memory and Serve's queue)."""
        while wait and len(self.pending) >= self.config.max_in_flight:
            self._complete(self.pending.popleft())
        self.serve.send(batch)
        self.pending.append(batch)

    def _keep_alive(self, wait_s: float) -> None:
        """Wait while staying in the group: partitions paused (nothing is fetched), the
        consumer polled (max.poll.interval.ms). A rebalance in here abandons the work."""
        if not self.paused and self.owned:
            self.consumer.pause(self.owned)
            self.paused = True
        epoch = self.epoch
        self.waiting = True
        try:
            message = self.consumer.poll(wait_s)
        finally:
            self.waiting = False
        if message is not None and message.error() is None:
            # Paused partitions return nothing; a message here came from a partition
            # assigned in this very poll. It is not lost: it is read again from its offset.
            self.consumer.seek(
                TopicPartition(message.topic() or "", message.partition() or 0,
                               message.offset() or 0)
            )
        if self.epoch != epoch:
            raise Interrupted

    def _resume(self) -> None:
        if self.paused:
            with contextlib.suppress(KafkaException):
                self.consumer.resume(self.owned)
            self.paused = False

    def _complete(self, batch: Batch) -> None:
        answers = iter(self.serve.answers(batch))
        done_ns = time.time_ns()
        self.output.begin()
        window = self.window
        counts = collections.Counter[str]()
        labelled = dropped = dead = 0
        for item in batch.items:
            answer: FrameAnswer | None = next(answers) if item.classifiable else None
            if isinstance(answer, FrameError):
                item.reason, item.detail, item.error_class = (
                    answer.reason, answer.detail, answer.error_class
                )
            if item.reason is not None:
                self.output.dead_letter(item)
                dead += 1
                log.info("DLQ %s[%d]@%d row %d: %s", item.source.topic, item.source.partition,
                         item.source.offset, item.row, item.reason)
                continue
            result = cast(ClassifyResult | None, answer)
            record = self.output.label(item, result, batch.submitted_ns, done_ns)
            if self.sink:
                self.sink.add_label(record)
            if result is None:
                dropped += 1
                continue
            labelled += 1
            frame = cast(FrameRecord, item.frame)
            if frame.label is not None:
                counts["with_ground_truth"] += 1
                counts["correct"] += int(result.class_id == frame.label)
            end_to_end = record["timings_ms"]["end_to_end"]
            window.latencies_ms.append(end_to_end)
            END_TO_END.observe(end_to_end)
        # Counted once per batch: a Prometheus increment takes a lock.
        for key, count, counter in (
            ("labelled", labelled, LABELLED), ("dropped_deadline", dropped, DROPPED),
            ("dlq", dead, DEAD),
        ):
            if count:
                counts[key] += count
                counter.inc(count)
        # Counted as done now, taken back if this work is redone (see _rewind).
        self.totals.update(counts)
        self.uncommitted.update(counts)
        window.dropped += dropped
        window.dlq += dead
        self.checkpoint.done(batch.offsets)

    # -- commit ----------------------------------------------------------------------------
    def _commit(self, reason: str) -> None:
        outcome = self.checkpoint.commit(reason)
        if outcome is Outcome.REDO:
            self._rewind(seek=not self.revoking)
            # Refused again and again (a topic deleted or unwritable): back off, then redo.
            self.redo_delay = min(max(0.1, self.redo_delay * 2), self.config.backoff_max_s)
            if not self.revoking:
                time.sleep(self.redo_delay)
        elif outcome is Outcome.COMMITTED:
            self.redo_delay = 0.0
            self.uncommitted.clear()
            if not self.pending and not self.batcher.current.items:
                self.checkpoint.txn_group = None  # nothing polled under it is held any more

    def _rewind(self, *, seek: bool = True) -> None:
        """After an aborted transaction or a refused record: drop the work in hand and (when
        the partitions stay ours) re-read them from their committed offsets."""
        self.epoch += 1
        self.checkpoint.forget()
        self.totals.subtract(self.uncommitted)  # that work is redone (or by the next owner)
        self.uncommitted.clear()
        for batch in self.pending:  # results of dropped work must not be produced
            batch.response = None
            batch.items.clear()
        self.pending.clear()
        self.batcher.clear()
        self._resume()
        assignment = self.owned
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
            self._subscribe()

    # -- latency aggregates ------------------------------------------------------------------
    def _lag(self) -> int | None:
        """Frames behind the partitions' ends (the ends the last fetches reported)."""
        assignment = self.owned
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
        if self.output.latency_paused:  # its topic refused one a moment ago
            return
        try:
            self.output.begin()
        except KafkaException as error:
            log.warning("latency aggregate not published: %s", rdkafka_reason(error))
            return
        self.output.latency(self.config.consumer_id, record)
        if self.exactly_once:
            if self.checkpoint.offsets:
                # Labels of this transaction whose offsets are not committed yet: committing
                # them alone would make them visible while their frames stay uncommitted, and
                # the next owner of those partitions would label them again. They commit
                # together with their offsets, or not at all.
                self._commit("latency")
            else:
                try:
                    self.output.commit_transaction()
                except KafkaException as error:
                    log.warning("latency transaction failed: %s", rdkafka_reason(error))
                    self.output.abort()
                    self._rewind(seek=not self.revoking)
        if self.sink:
            self.sink.add_latency(record)
        self.totals["latency_windows"] += 1

    def _close(self) -> None:
        self.closing = True
        try:
            self.output.abort()  # exactly-once: uncommitted work is redone by the next owner
            left = self.output.flush(30)
            if left:
                log.warning("%d records still unacknowledged at close", left)
        finally:
            self.consumer.close()
            if self.sink:
                self.sink.close()
