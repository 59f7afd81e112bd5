"""Batching, the output side and the checkpoint, without a broker (fake Kafka clients, as
quix-streams tests its checkpoint): the order of the commit path's steps and what a refused
record does to it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from serving.frames import FrameRecord
from serving.results import ClassifyResult
from streams.batching import Batcher
from streams.checkpoint import Checkpoint, Outcome
from streams.output import Output
from streams.parsing import Item, Source

MODEL = {"name": "m", "version": "1", "sha256": "ab", "runtime": "litert"}


def item(offset: int, row: int = 0, size: int = 10, reason: str | None = None) -> Item:
    frame = FrameRecord("cam-1", offset, 1_000, "raw", 1, 1, 1, b"x" * size, None)
    return Item(Source("frames", 0, offset, b"cam-1", 2_000, 1_500), row, frame,
                reason=reason, reference_ns=1_000)


class FakeMessage:
    def __init__(self, topic: str, value: bytes, headers: Any) -> None:
        self._topic, self._value, self._headers = topic, value, headers

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value

    def headers(self) -> Any:
        return self._headers


class FakeProducer:
    """Records every call; ``refuse`` maps a topic to the error its deliveries get."""

    def __init__(self, on_delivery: Any = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.queued: list[FakeMessage] = []
        self.refuse: dict[str, int] = {}
        self.too_large_now: set[str] = set()
        self.on_delivery = on_delivery

    def produce(self, topic: str, value: Any = None, key: Any = None, headers: Any = None) -> None:
        if topic in self.too_large_now:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
        self.calls.append(("produce", topic))
        self.queued.append(FakeMessage(topic, value, headers))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        self.calls.append(("flush", None))
        for message in self.queued:
            code = self.refuse.get(message.topic())
            if code is not None:
                self.on_delivery(KafkaError(code, "refused"), message)
        self.queued.clear()
        return 0

    def begin_transaction(self) -> None:
        self.calls.append(("begin", None))

    def send_offsets_to_transaction(self, offsets: Any, group: Any, timeout: float = 0) -> None:
        self.calls.append(("send_offsets", [(tp.partition, tp.offset) for tp in offsets]))

    def commit_transaction(self, timeout: float = 0) -> None:
        self.calls.append(("commit_txn", None))

    def abort_transaction(self, timeout: float = 0) -> None:
        self.calls.append(("abort", None))


class FakeConsumer:
    def __init__(self, calls: list[tuple[str, Any]]) -> None:
        self.calls = calls

    def commit(self, offsets: Any = None, asynchronous: bool = True) -> list[Any]:
        self.calls.append(("commit", [(tp.partition, tp.offset) for tp in offsets]))
        return []

    def consumer_group_metadata(self) -> str:
        return "group-metadata"


def wiring(exactly_once: bool = False) -> tuple[FakeProducer, Output, Checkpoint]:
    producer = FakeProducer()
    output = Output(producer, labels_topic="labels", dlq_topic="dlq", latency_topic="latency",  # type: ignore[arg-type]
                    dlq_max_value_bytes=10_000, transactional=exactly_once)
    producer.on_delivery = output.delivered
    checkpoint = Checkpoint(FakeConsumer(producer.calls), output,  # type: ignore[arg-type]
                            exactly_once=exactly_once, interval_ms=0)
    return producer, output, checkpoint


RESULT = ClassifyResult(4, "Coat", 0.9, MODEL, 0.5)


def test_batches_are_cut_by_frames_and_by_bytes_and_keep_the_last_rows_offset() -> None:
    batcher = Batcher(max_frames=3, max_bytes=25, max_wait_ms=10)
    full = batcher.add([item(0, r) for r in range(4)], ("frames", 0), 1)
    assert [len(b.items) for b in full] == [2]  # 2 x 10 bytes, the third would be 30 > 25
    assert full[0].offsets == {}  # the message's offset goes with its last row
    assert batcher.current.offsets == {("frames", 0): 1}
    full = batcher.add([item(1, 0, size=40)], ("frames", 0), 2)
    assert [b.frame_bytes for b in full] == [20, 40]  # a frame alone over max_bytes: alone


def test_dead_letters_ride_in_batches_without_counting_as_frames() -> None:
    batcher = Batcher(max_frames=1, max_bytes=1000, max_wait_ms=10)
    full = batcher.add([item(0, reason="bad_value"), item(0, 1)], ("frames", 0), 1)
    assert len(full) == 1 and [i.reason for i in full[0].items] == ["bad_value", None]
    assert full[0].frames == [full[0].items[1].frame]


def test_at_least_once_flushes_before_it_commits() -> None:
    producer, output, checkpoint = wiring()
    output.label(item(5), RESULT, 1_800, 3_000)
    checkpoint.done({("frames", 0): 6})
    assert checkpoint.commit("interval") is Outcome.COMMITTED
    assert [c[0] for c in producer.calls] == ["produce", "flush", "commit"]
    assert producer.calls[-1] == ("commit", [(0, 6)])
    assert checkpoint.commit("interval") is Outcome.NOTHING


def test_a_refused_label_blocks_the_commit_and_its_frame_goes_to_the_dlq_when_redone() -> None:
    producer, output, checkpoint = wiring()
    producer.refuse["labels"] = KafkaError.MSG_SIZE_TOO_LARGE
    first = item(5)
    output.label(first, RESULT, 1_800, 3_000)
    checkpoint.done({("frames", 0): 6})
    assert checkpoint.commit("interval") is Outcome.REDO
    assert not any(c[0] == "commit" for c in producer.calls)  # never past an unlabelled frame
    assert output.route(item(5)) == "dlq"  # learned: the second pass routes it differently
    assert output.route(item(6)) is None


def test_a_transient_refusal_is_redone_as_it_was() -> None:
    producer, output, checkpoint = wiring()
    producer.refuse["labels"] = KafkaError.UNKNOWN_TOPIC_OR_PART  # topic deleted
    output.label(item(5), RESULT, 1_800, 3_000)
    checkpoint.done({("frames", 0): 6})
    assert checkpoint.commit("interval") is Outcome.REDO
    assert output.route(item(5)) is None and not output.learned


def test_a_dead_letter_too_large_for_its_topic_is_redone_without_its_value() -> None:
    producer, output, checkpoint = wiring()
    producer.refuse["dlq"] = KafkaError.MSG_SIZE_TOO_LARGE
    bad = item(9, reason="undecodable")
    bad.value = b"v" * 50
    output.dead_letter(bad)
    checkpoint.done({("frames", 0): 10})
    assert checkpoint.commit("interval") is Outcome.REDO
    producer.refuse.clear()
    output.dead_letter(bad)
    headers = dict(producer.queued[-1].headers())
    assert producer.queued[-1].value() == b""
    assert headers["error.value_omitted"] == b"50"
    assert headers["source.offset"] == b"9" and headers["source.row"] == b"0"


def test_a_record_refused_before_it_is_sent_counts_as_refused() -> None:
    producer, output, checkpoint = wiring()
    producer.too_large_now.add("labels")
    output.label(item(1), RESULT, 1_800, 3_000)
    checkpoint.done({("frames", 0): 2})
    assert checkpoint.commit("interval") is Outcome.REDO
    assert output.route(item(1)) == "dlq"


def test_dead_letters_carry_the_row_and_the_row_alone() -> None:
    producer, output, _ = wiring()
    bad = item(3, row=2, reason="undecodable")  # a row of a larger message: value None
    output.dead_letter(bad)
    message = producer.queued[-1]
    headers = dict(message.headers())
    assert headers["source.row"] == b"2" and headers["error.reason"] == b"undecodable"
    from serving.frames import decode_frames

    assert decode_frames(message.value()) == [bad.frame]


def test_exactly_once_commits_offsets_inside_the_transaction() -> None:
    producer, output, checkpoint = wiring(exactly_once=True)
    output.begin()
    output.label(item(5), RESULT, 1_800, 3_000)
    checkpoint.done({("frames", 0): 6})
    assert checkpoint.commit("interval") is Outcome.COMMITTED
    steps = [c[0] for c in producer.calls]
    assert steps == ["begin", "produce", "flush", "send_offsets", "commit_txn"]
    assert "commit" not in steps  # offsets go through the transaction only


def test_exactly_once_aborts_when_a_record_was_refused() -> None:
    producer, output, checkpoint = wiring(exactly_once=True)
    producer.refuse["labels"] = KafkaError.TOPIC_AUTHORIZATION_FAILED
    output.begin()
    output.label(item(5), RESULT, 1_800, 3_000)
    checkpoint.done({("frames", 0): 6})
    assert checkpoint.commit("interval") is Outcome.REDO
    steps = [c[0] for c in producer.calls]
    assert "abort" in steps and "send_offsets" not in steps and "commit_txn" not in steps


def test_labels_measure_latency_from_the_trusted_time_and_flag_skew() -> None:
    producer, output, _ = wiring()
    skewed = item(1)
    skewed.reference_ns, skewed.clock_skew_ms = 1_500, 3_600_000.0
    record = output.label(skewed, RESULT, 1_800, 2_500)
    assert record["timings_ms"]["end_to_end"] == pytest.approx(0.001)
    assert record["timings_ms"]["clock_skew"] == 3_600_000.0
    assert orjson.loads(producer.queued[-1].value())["source"]["offset"] == 1


def test_a_refused_latency_aggregate_is_not_redone_and_pauses_aggregates() -> None:
    producer, output, checkpoint = wiring()
    producer.refuse["latency"] = KafkaError.UNKNOWN_TOPIC_OR_PART  # latency topic deleted
    output.label(item(5), RESULT, 1_800, 3_000)
    output.latency("member-1", {"frames": 1})
    checkpoint.done({("frames", 0): 6})
    assert checkpoint.commit("interval") is Outcome.COMMITTED  # the frame's label is written
    assert output.latency_paused


def test_exactly_once_redoes_a_transaction_whose_aggregate_was_refused_once() -> None:
    producer, output, checkpoint = wiring(exactly_once=True)
    producer.refuse["latency"] = KafkaError.UNKNOWN_TOPIC_OR_PART
    output.begin()
    output.label(item(5), RESULT, 1_800, 3_000)
    output.latency("member-1", {"frames": 1})
    checkpoint.done({("frames", 0): 6})
    assert checkpoint.commit("interval") is Outcome.REDO  # the transaction cannot commit
    assert output.latency_paused  # and the next one does not carry an aggregate


def test_live_cameras_send_each_frame_at_once_and_replays_batch() -> None:
    from cluster.cameras import CameraProcess
    from cluster.settings import FramecastSettings
    from streams.producers import camera_linger_ms

    assert camera_linger_ms(15.0) == 0  # a frame rate: no linger
    assert camera_linger_ms(0) == 5  # flat out: messages batch
    settings = FramecastSettings()
    paced = CameraProcess(settings, "127.0.0.1:9", "frames", source="synthetic", cameras=2,
                          fps=15.0, per_camera=3, encoding="raw").command
    assert "--linger-ms" not in paced  # produce's own default applies
    chosen = CameraProcess(settings, "127.0.0.1:9", "frames", source="synthetic", cameras=2,
                           fps=15.0, per_camera=3, encoding="raw", linger_ms=7).command
    assert chosen[chosen.index("--linger-ms") + 1] == "7"
