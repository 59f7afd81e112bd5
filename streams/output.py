"""The classifier's output side: labels, dead letters and latency aggregates on their way to
Kafka, what the brokers refused, and the producer's transactions.

Records are produced asynchronously (librdkafka batches them); only failures are reported
(``delivery.report.only.error``), and each is kept as a :class:`Refusal` until the checkpoint
looks at it. A refusal of a record that can never be written as it is (too large for its
topic) is *learned*: the frame is done differently when it is read again (its label becomes
a dead letter; a dead letter loses its value), so a rewind never repeats forever. Any other
refusal (a topic deleted or unwritable, brokers away) is transient: the checkpoint does not
commit past it, and the work is redone after a back-off.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from serving.frames import encode_frames
from serving.results import ClassifyResult
from streams.client import rdkafka_reason
from streams.exceptions import StreamsError
from streams.labels import label_model, label_record
from streams.parsing import Item

log = logging.getLogger(__name__)

TXN_TIMEOUT_S = 60.0  # one transactional call (send offsets, commit, abort)
# Errors that say "this record, as it is, can never be written to this topic".
# (librdkafka's own check against message.max.bytes raises MSG_SIZE_TOO_LARGE too)
_RECORD_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE}
_LEARNED_MAX = 100_000  # sources remembered as needing another route (oldest forgotten)
SourceKey = tuple[str, int, int, int]  # topic, partition, offset, row


@dataclass(frozen=True, slots=True)
class Refusal:
    """A record the brokers (or the client) refused."""

    topic: str
    kind: str  # label, dlq, latency
    reason: str  # "NAME: text"
    too_large: bool  # the record itself can never be written there
    source: SourceKey | None  # the frame it was for (labels and dead letters)


class Output:
    """Produces the classifier's records and keeps what was refused."""

    def __init__(
        self,
        producer: Producer,  # or anything with its methods (unit tests)
        *,
        labels_topic: str,
        dlq_topic: str,
        latency_topic: str,
        dlq_max_value_bytes: int,
        transactional: bool,
    ) -> None:
        self.producer = producer
        self.labels_topic, self.dlq_topic = labels_topic, dlq_topic
        self.latency_topic = latency_topic
        self.dlq_max_value_bytes = dlq_max_value_bytes
        self.transactional = transactional
        self.in_txn = False
        self.refusals: list[Refusal] = []
        self.latency_paused_until = 0.0  # time.monotonic(): see pause_latency
        self._model_of: dict[str, Any] | None = None
        self._model: dict[str, Any] | None = None
        # Sources whose label (or full dead letter) a topic refused as too large.
        self.learned: OrderedDict[SourceKey, str] = OrderedDict()

    # -- records -----------------------------------------------------------------------------
    def label(self, item: Item, result: ClassifyResult | None, submitted_ns: int,
              labeled_ns: int) -> dict[str, Any]:
        """Produce the label of ``item`` (``result`` None: dropped for its deadline);
        returns the record."""
        frame = item.frame
        source = item.source
        assert frame is not None  # noqa: S101 - only frames are labelled
        timings = {
            "broker": round(item.broker_ms, 3),
            "queue": round(max(0, submitted_ns - source.consumed_ns) / 1e6, 3),
            "decode": result.decode_ms if result else 0.0,  # rounded by the replica
            "inference": round(result.inference_ms, 3) if result else 0.0,
            "end_to_end": round(max(0, labeled_ns - item.reference_ns) / 1e6, 3),
        }
        if item.clock_skew_ms is not None:
            timings["clock_skew"] = item.clock_skew_ms
        record = label_record(
            stream_id=frame.stream_id,
            frame_index=frame.frame_index,
            topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            row=item.row,
            result=result,
            captured_at_ns=frame.captured_at_ns,
            labeled_at_ns=labeled_ns,
            timings_ms=timings,
            ground_truth=frame.label,
            model=self._label_model(result),
        )
        self.produce(self.labels_topic, source.key, orjson.dumps(record), kind="label")
        return record

    def _label_model(self, result: ClassifyResult | None) -> dict[str, Any] | None:
        # Every result of a Serve call shares one model dict: its label fields are made once
        # (a dict per frame was ~0.5 us of the loop's time per label).
        if result is None:
            return None
        if self._model_of is not result.model:
            self._model_of, self._model = result.model, label_model(result.model)
        return self._model

    def dead_letter(self, item: Item) -> None:
        """Produce ``item``'s DLQ record: the original key and value (the row alone for a
        row of a larger message), the reason and where it came from."""
        source = item.source
        headers = [(k, v) for k, v in item.headers if not k.startswith(("error.", "source."))]
        headers += [
            ("error.reason", (item.reason or "").encode()),
            ("error.class", item.error_class.encode()),
            ("error.detail", item.detail[:1000].encode(errors="replace")),
            ("source.topic", source.topic.encode()),
            ("source.partition", str(source.partition).encode()),
            ("source.offset", str(source.offset).encode()),
            ("source.row", str(item.row).encode()),
        ]
        value = item.value
        if value is None and item.frame is not None:
            value = encode_frames([item.frame])
        value = value or b""
        omit = len(value) > self.dlq_max_value_bytes or (
            self.learned.get(self.source_key(item)) == "omit_value"
        )
        if omit and value:
            headers.append(("error.value_omitted", str(len(value)).encode()))
            value = b""
        self.produce(self.dlq_topic, source.key, value, headers, kind="dlq")

    def pause_latency(self, seconds: float) -> None:
        """Publish no latency aggregate for ``seconds`` (its topic refused one)."""
        self.latency_paused_until = time.monotonic() + seconds

    @property
    def latency_paused(self) -> bool:
        """Whether latency aggregates are paused now."""
        return time.monotonic() < self.latency_paused_until

    def latency(self, consumer_id: str, record: dict[str, Any]) -> None:
        """Produce one latency aggregate."""
        self.produce(self.latency_topic, consumer_id.encode(), orjson.dumps(record),
                     kind="latency")

    @staticmethod
    def source_key(item: Item) -> SourceKey:
        """The key a learned route is remembered by."""
        s = item.source
        return (s.topic, s.partition, s.offset, item.row)

    def route(self, item: Item) -> str | None:
        """A learned route for this item: ``dlq`` (its label cannot be written)."""
        return self.learned.get(self.source_key(item)) if self.learned else None

    # -- producing ---------------------------------------------------------------------------
    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
        *,
        kind: str,
    ) -> None:
        """Queue a record; a record refused before it is sent is kept as a Refusal."""
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=cast(Any, headers))
                return
            except BufferError:  # the client's queue is full: let deliveries drain it
                self.producer.poll(0.05)
            except KafkaException as error:  # refused before sending (e.g. too large)
                inner = error.args[0] if error.args else None
                too_large = isinstance(inner, KafkaError) and inner.code() in _RECORD_TOO_LARGE
                self._refused(topic, kind, rdkafka_reason(error), too_large, value, headers)
                return

    def delivered(self, error: KafkaError | None, message: Message) -> None:
        """The producer's delivery callback (only failures reach it)."""
        if error is None:
            return
        topic = message.topic() or "?"
        kind = (
            "label" if topic == self.labels_topic
            else "dlq" if topic == self.dlq_topic
            else "latency"
        )
        headers = cast(list[tuple[str, bytes]] | None, message.headers())
        self._refused(
            topic,
            kind,
            f"{error.name()}: {error.str()}",
            error.code() in _RECORD_TOO_LARGE,
            message.value() or b"",
            headers,
        )

    def _refused(
        self,
        topic: str,
        kind: str,
        reason: str,
        too_large: bool,
        value: bytes,
        headers: list[tuple[str, bytes]] | None,
    ) -> None:
        self.refusals.append(Refusal(topic, kind, reason, too_large, _source_of(kind, value,
                                                                                 headers)))

    def learn(self) -> list[Refusal]:
        """Take the refusals since the last call; remember a different route for each
        record that can never be written as it is. Returns them."""
        refusals, self.refusals = self.refusals, []
        for refusal in refusals:
            if not refusal.too_large or refusal.source is None:
                continue
            # A label too large: the frame goes to the DLQ; a dead letter too large (that
            # one included): it goes without its value.
            route = "dlq" if refusal.kind == "label" else "omit_value"
            self.learned[refusal.source] = route
            self.learned.move_to_end(refusal.source)
            while len(self.learned) > _LEARNED_MAX:
                self.learned.popitem(last=False)
        return refusals

    def poll(self) -> None:
        """Serve delivery reports."""
        self.producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        """Wait for every queued record; the number still unacknowledged."""
        return self.producer.flush(timeout_s)

    # -- transactions ------------------------------------------------------------------------
    def begin(self) -> None:
        """Open a transaction if this output is transactional and none is open."""
        if self.transactional and not self.in_txn:
            self.transactional_call(self.producer.begin_transaction, "begin")
            self.in_txn = True

    def commit_transaction(self, offsets: Any = None, group: Any = None) -> None:
        """Add ``offsets`` (with the consumer ``group``'s metadata) and commit. Raises
        KafkaException; the caller aborts."""
        if offsets:
            self.transactional_call(
                lambda: self.producer.send_offsets_to_transaction(offsets, group, TXN_TIMEOUT_S),
                "send offsets",
            )
        self.transactional_call(lambda: self.producer.commit_transaction(TXN_TIMEOUT_S),
                                "commit")
        self.in_txn = False

    def abort(self) -> None:
        """Abort the open transaction (nothing of it becomes visible)."""
        if not self.in_txn:
            return
        try:
            self.transactional_call(
                lambda: self.producer.abort_transaction(TXN_TIMEOUT_S), "abort"
            )
        except KafkaException as error:
            log.warning("abort failed: %s", rdkafka_reason(error))
        self.in_txn = False

    def transactional_call(self, call: Callable[[], Any], what: str) -> Any:
        """A transactional producer call: retried while librdkafka says it may be; fatal
        errors (fenced by a newer producer with this transactional id) raise StreamsError;
        others raise KafkaException for the caller to abort."""
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
                        f"{rdkafka_reason(error)}; another classifier with the same "
                        "consumer id may have replaced this one"
                    ) from None
                if not kafka_error.retriable() or attempt == 2:
                    raise
                log.warning("transaction %s: %s; retrying", what, rdkafka_reason(error))
        return None  # not reached


def _source_of(
    kind: str, value: bytes, headers: list[tuple[str, bytes]] | None
) -> SourceKey | None:
    """The frame a refused label or dead letter was for."""
    try:
        if kind == "label":
            source = orjson.loads(value)["source"]
            return (source["topic"], source["partition"], source["offset"], source["row"])
        if kind == "dlq":
            named = dict(headers or [])
            return (
                named["source.topic"].decode(),
                int(named["source.partition"]),
                int(named["source.offset"]),
                int(named["source.row"]),
            )
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
        return None
    return None
