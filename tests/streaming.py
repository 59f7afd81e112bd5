"""Helpers for tests that push numbered frames through the real broker and the real Serve app.

Every frame is ``(stream_id, frame_index)``; tests compare the set of frames sent with the
labels read back from the labels topic, and count duplicates and losses with :func:`tally`.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess  # nosec B404 - typing of the classifier processes tests start
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from confluent_kafka import Producer
from kafka import KafkaConsumer, KafkaProducer

from cluster.processes import wait_until
from serving.fashion_mnist import load_fashion_mnist
from serving.frames import ARROW_CONTENT_TYPE, FRAME_SCHEMA, FrameRecord, encode_frames
from streams.classifier import ClassifierConfig, StreamClassifier
from streams.client import admin_client
from streams.config import KafkaSettings
from streams.labels import LabelRecord
from streams.serve_client import serve_classify_fn
from streams.topics import TopicSpec, ensure_topics
from tests.kafka_python import kafka_python_config

IMAGES, LABELS = load_fashion_mnist("test", limit=64)

FrameKey = tuple[str, int]


def topics(
    kafka_settings: KafkaSettings,
    partitions: int = 3,
    replication_factor: int = 1,
    topic_config: dict[str, str] | None = None,
) -> ClassifierConfig:
    """Fresh topics and group for one test."""
    tag = uuid.uuid4().hex[:8]
    config = ClassifierConfig(
        frames_topic=f"frames-{tag}",
        labels_topic=f"labels-{tag}",
        latency_topic=f"latency-{tag}",
        dlq_topic=f"dlq-{tag}",
        group=f"g-{tag}",
        idle_exit_s=6.0,  # from assignment: a loaded broker's first fetch has taken > 4 s
        latency_window_s=1.0,
    )
    common = {"replication_factor": replication_factor, "config": topic_config or {}}
    with admin_client(kafka_settings) as admin:
        ensure_topics(
            admin,
            [
                TopicSpec(name=config.frames_topic, partitions=partitions, **common),
                TopicSpec(name=config.labels_topic, partitions=partitions, **common),
                TopicSpec(name=config.latency_topic, **common),
                TopicSpec(name=config.dlq_topic, **common),
            ],
        )
    return config


def set_max_message_bytes(kafka_settings: KafkaSettings, topic: str, max_bytes: int) -> None:
    """Change a topic's max.message.bytes on the broker (takes effect for the next write)."""
    with admin_client(kafka_settings) as admin:
        admin.alter_topic_configs(topic, {"max.message.bytes": str(max_bytes)})


def producer(kafka_settings: KafkaSettings, **extra: Any) -> KafkaProducer:
    return KafkaProducer(**kafka_python_config(kafka_settings), acks="all", **extra)


def frame(stream: int, index: int, captured_at_ns: int | None = None) -> FrameRecord:
    """Frame ``index`` of camera ``cam-<stream>``: a Fashion-MNIST image, raw pixels."""
    row = (index * 7 + stream) % len(IMAGES)
    return FrameRecord(
        stream_id=f"cam-{stream}",
        frame_index=index,
        captured_at_ns=captured_at_ns or time.time_ns(),
        encoding="raw",
        height=28,
        width=28,
        channels=1,
        data=IMAGES[row].tobytes(),
        label=int(LABELS[row]),
    )


def send_arrow_frames(
    kafka_settings: KafkaSettings,
    topic: str,
    streams: int,
    per_stream: int,
    captured_at_ns: int | None = None,
    fps: float = 0.0,
    start: int = 0,
    stop: threading.Event | None = None,
) -> list[tuple[str, int, int]]:
    """Raw Fashion-MNIST frames, one per message, from an idempotent producer (acks=all).

    Paced at ``fps`` per stream when > 0; numbered ``start .. start + per_stream - 1``.
    Returns (stream_id, frame_index, image row) of every frame the broker acknowledged and
    raises if any was not acknowledged. ``stop`` ends the feed early.
    """
    sent = []
    p = producer(kafka_settings, enable_idempotence=True, linger_ms=2)
    futures = []
    started = time.monotonic()
    for i in range(start, start + per_stream):
        if stop is not None and stop.is_set():
            break
        if fps > 0:
            time.sleep(max(0.0, started + (i - start) / fps - time.monotonic()))
        for s in range(streams):
            f = frame(s, i, captured_at_ns)
            futures.append(
                p.send(
                    topic,
                    key=f.stream_id.encode(),
                    value=encode_frames([f]),
                    headers=[("content-type", ARROW_CONTENT_TYPE.encode())],
                )
            )
            sent.append((f.stream_id, i, (i * 7 + s) % len(IMAGES)))
    p.flush(timeout=180)
    p.close()
    for future in futures:
        future.get(timeout=1)  # raises the delivery error, if any
    return sent


class Feeder(threading.Thread):
    """send_arrow_frames in the background; ``keys`` are the acknowledged frames."""

    def __init__(self, kafka_settings: KafkaSettings, topic: str, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.args = (kafka_settings, topic)
        self.kwargs = kwargs
        self.stop_event = threading.Event()
        self.sent: list[tuple[str, int, int]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sent = send_arrow_frames(*self.args, stop=self.stop_event, **self.kwargs)
        except BaseException as error:  # reported by finish()
            self.error = error

    def finish(self, timeout: float = 300) -> set[FrameKey]:
        self.join(timeout)
        assert not self.is_alive(), "the feeder did not finish"
        if self.error is not None:
            raise self.error
        return {(s, i) for s, i, _ in self.sent}


def classifier(
    kafka_settings: KafkaSettings, config: ClassifierConfig, app: str
) -> StreamClassifier:
    classify, retriable = serve_classify_fn(app)
    return StreamClassifier(
        kafka_settings, str(kafka_settings.bootstrap_servers), config, classify, retriable
    )


def run_classifier(
    kafka_settings: KafkaSettings, config: ClassifierConfig, app: str
) -> dict[str, Any]:
    return classifier(kafka_settings, config, app).run()


class BackgroundClassifier(threading.Thread):
    """One StreamClassifier running in a thread of this process."""

    def __init__(self, member: StreamClassifier) -> None:
        super().__init__(daemon=True)
        self.member = member
        self.totals: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.totals = self.member.run()
        except BaseException as error:  # reported by finish()
            self.error = error

    def abandon(self) -> None:
        """Stop it if it still runs (a failed test must not leave it consuming)."""
        if self.is_alive():
            self.member.stop()
            self.join(120)

    def finish(self, timeout: float = 300) -> dict[str, Any]:
        self.join(timeout)
        assert not self.is_alive(), "the classifier did not stop"
        if self.error is not None:
            raise self.error
        assert self.totals is not None
        return self.totals


def read_topic(
    kafka_settings: KafkaSettings,
    topic: str,
    expected: int,
    committed_only: bool = False,
    settle_s: float = 3.0,
    timeout_s: float = 60.0,
) -> list[Any]:
    """Every record of topic (waits for `expected`, then a little longer for extras)."""
    consumer = KafkaConsumer(
        topic,
        **kafka_python_config(kafka_settings),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed" if committed_only else "read_uncommitted",
        consumer_timeout_ms=int(settle_s * 1000),
    )
    records = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = list(consumer)
        records += batch
        if len(records) >= expected and not batch:
            break
    consumer.close()
    return records


def wait_for_start(process: subprocess.Popen[bytes], log: Path, timeout_s: float = 180) -> None:
    """Block until a ``framecast stream run`` process logged its start line (or exited)."""
    assert wait_until(
        lambda: "stream classifier" in log.read_text() or process.poll() is not None,
        timeout=timeout_s,
    ), "the classifier did not start"


def committed_offsets(kafka_settings: KafkaSettings, group: str) -> int:
    """The sum of the offsets ``group`` has committed, over all its partitions."""
    with admin_client(kafka_settings) as admin:
        offsets = admin.committed_offsets(group)
    return sum(max(0, offset) for offset in offsets.values())


def labels_of(records: list[Any]) -> list[LabelRecord]:
    return [LabelRecord.model_validate_json(r.value) for r in records]


class LabelProbe:
    """Watches a labels topic: how many labels, and which frames, have arrived so far."""

    def __init__(self, kafka_settings: KafkaSettings, topic: str) -> None:
        self.consumer = KafkaConsumer(
            topic,
            **kafka_python_config(kafka_settings),
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=200,
        )
        self.seen = 0
        self.keys: set[FrameKey] = set()

    def _read(self, until: int | None = None) -> None:
        # Returns after 200 ms without a record, or once ``until`` labels were seen: on a quiet
        # machine labels flow without such a gap, and the caller must act mid-stream.
        for record in self.consumer:
            self.seen += 1
            label = json.loads(record.value)
            self.keys.add((label["stream_id"], label["frame_index"]))
            if until is not None and self.seen >= until:
                return

    def wait_for(self, count: int, timeout_s: float = 180) -> int:
        """Block until ``count`` labels were seen in all (or timeout); returns the count."""
        deadline = time.monotonic() + timeout_s
        while self.seen < count and time.monotonic() < deadline:
            self._read(until=count)
        return self.seen

    def wait_for_frames(self, keys: set[FrameKey], timeout_s: float = 180) -> bool:
        """Block until every frame in keys has a label (or timeout); True if they all do."""
        deadline = time.monotonic() + timeout_s
        while not keys <= self.keys and time.monotonic() < deadline:
            self._read()
        return keys <= self.keys

    def close(self) -> None:
        self.consumer.close()


def stop_when_labelled(
    member: BackgroundClassifier, probe: LabelProbe, keys: set[FrameKey], timeout_s: float = 180
) -> dict[str, Any]:
    """Stop a classifier once every frame has a label (or the wait timed out): the stop is
    explicit, so a starved feeder on a busy machine cannot make it exit early on idleness.
    Returns its totals; missing frames show up as losses in :func:`tally`."""
    probe.wait_for_frames(keys, timeout_s)
    member.member.stop()
    return member.finish()


def tally(expected: Iterable[FrameKey], labels: list[LabelRecord]) -> dict[str, int]:
    """Frames sent, labels received, duplicates (extra labels of one frame), losses."""
    wanted = set(expected)
    counts = collections.Counter((lab.stream_id, lab.frame_index) for lab in labels)
    by_source = collections.Counter(
        (lab.source.topic, lab.source.partition, lab.source.offset, lab.source.row)
        for lab in labels
    )
    return {
        "frames_sent": len(wanted),
        "labels_received": len(labels),
        "duplicates": sum(c - 1 for c in counts.values()),
        "losses": len(wanted - set(counts)),
        "unexpected": len(set(counts) - wanted),
        "distinct_sources": len(by_source),
    }


def stream_run_argv(
    kafka_settings: KafkaSettings,
    config: ClassifierConfig,
    app: str,
    ray_head: Any,
    home: Path,
    *extra: str,
    idle_exit_s: float = 5.0,
) -> list[str]:
    """`framecast stream run` for config's topics and group, as a separate process."""
    return [
        str(Path(sys.executable).parent / "framecast"),
        "--home",
        str(home),
        "--bootstrap-servers",
        str(kafka_settings.bootstrap_servers),
        "--ray-address",
        ray_head.address,
        "stream",
        "run",
        "--frames",
        config.frames_topic,
        "--labels",
        config.labels_topic,
        "--latency",
        config.latency_topic,
        "--dlq",
        config.dlq_topic,
        "--group",
        config.group,
        "--guarantee",
        config.guarantee,
        "--app-name",
        app,
        *extra,
        "--idle-exit-s",
        str(idle_exit_s),  # last: callers may swap the value
    ]


def stream_run_env() -> dict[str, str]:
    """This process's env (with its Ray token) without FRAMECAST_* overrides."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FRAMECAST_")}


@dataclass
class FaultRun:
    """What a stream run through a fault produced: frames sent, the classifier's totals,
    the labels read back (committed only under exactly-once) and their tally."""

    expected: set[FrameKey]
    totals: dict[str, Any]
    labels: list[LabelRecord]
    counts: dict[str, int]
    outcome: Any = None


def stream_through_fault(
    kafka_settings: KafkaSettings,
    config: ClassifierConfig,
    app: str,
    fault: Callable[[LabelProbe, Feeder], Any],
    *,
    streams: int,
    per_stream: int,
    fps: float,
    fault_after: int,
) -> FaultRun:
    """Numbered frames through one classifier; ``fault(probe, feeder)`` strikes once
    ``fault_after`` labels are out. The classifier is stopped once every frame is labelled."""
    config = config.model_copy(update={"idle_exit_s": None})
    probe = LabelProbe(kafka_settings, config.labels_topic)
    feeder = Feeder(
        kafka_settings, config.frames_topic, streams=streams, per_stream=per_stream, fps=fps
    )
    member = BackgroundClassifier(classifier(kafka_settings, config, app))
    member.start()
    feeder.start()
    try:
        assert probe.wait_for(fault_after) >= fault_after, "no labels before the fault"
        outcome = fault(probe, feeder)
        expected = feeder.finish()
        totals = stop_when_labelled(member, probe, expected)
    finally:
        feeder.stop_event.set()
        member.abandon()
        probe.close()
    committed_only = config.guarantee == "exactly-once"
    labels = labels_of(
        read_topic(kafka_settings, config.labels_topic, len(expected), committed_only)
    )
    return FaultRun(expected, totals, labels, tally(expected, labels), outcome)


# -- hostile producers (issue 17) ----------------------------------------------------------------


class RawProducer:
    """A plain confluent-kafka producer that sends each message at once (acks=all) and
    returns its offset: bad messages land at known offsets between numbered good ones."""

    def __init__(self, kafka_settings: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self.producer = Producer(
            {
                **kafka_settings.rdkafka_config(),
                "acks": "all",
                "message.max.bytes": 32 * 1024 * 1024,
            }
        )

    def send(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        key: bytes | None = None,
        timestamp_ms: int = 0,
    ) -> int:
        """Produce one message and wait for it; its offset (raises if it was refused)."""
        outcome: list[Any] = []
        self.producer.produce(
            self.topic,
            value=value,
            key=key,
            headers=headers,
            timestamp=timestamp_ms,
            on_delivery=lambda error, message: outcome.append(error or message.offset()),
        )
        self.producer.flush(60)
        assert outcome, "no delivery report within 60 s"
        if not isinstance(outcome[0], int):
            raise AssertionError(f"the broker refused the message: {outcome[0]}")
        return outcome[0]

    def good(self, stream: int, index: int, **frame_args: Any) -> int:
        """Frame ``index`` of ``cam-<stream>`` as a one-row Arrow message; its offset."""
        f = frame(stream, index, **frame_args)
        arrow = [("content-type", ARROW_CONTENT_TYPE.encode())]
        return self.send(encode_frames([f]), arrow, f.stream_id.encode())


class RawHeaderKey(str):
    """A header key whose bytes are not UTF-8. confluent-kafka cannot send one (it sends
    ``str(bytes)``); kafka-python encodes each key with ``key.encode("utf-8")``, which this
    answers with the raw bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawHeaderKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


def _string_column(values: list[str | bytes | None]) -> pa.Array:
    """A string array over raw bytes (UTF-8 or not), null where None."""
    offsets, data, valid = [0], b"", []
    for v in values:
        data += v.encode() if isinstance(v, str) else (v or b"")
        offsets.append(len(data))
        valid.append(v is not None)
    mask = None if all(valid) else pa.array(valid, pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(
        pa.string(),
        len(values),
        [mask, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(data)],
        null_count=valid.count(False),
    )


def arrow_message(
    rows: list[dict[str, Any]], compression: str | None = None, batch_rows: int | None = None
) -> bytes:
    """An Arrow IPC stream in the frame schema from rows as dicts, values unchecked: strings
    may be bytes that are not UTF-8, and any column may hold nulls (None)."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    step = batch_rows or max(1, len(rows))
    with pa.ipc.new_stream(sink, FRAME_SCHEMA, options=options) as writer:
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            columns = [
                _string_column([r[f.name] for r in chunk])
                if f.type == pa.string()
                else pa.array([r[f.name] for r in chunk], f.type)
                for f in FRAME_SCHEMA
            ]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=FRAME_SCHEMA))
    return bytes(sink.getvalue().to_pybytes())


def frame_row(stream: int | str | bytes, index: int, **values: Any) -> dict[str, Any]:
    """A good frame's row (as :func:`frame` makes it) of stream ``cam-<stream>`` (or that
    name, if a string or bytes) with ``values`` replaced."""
    name = f"cam-{stream}" if isinstance(stream, int) else stream
    f = frame(0, index)
    row = dict(zip(FRAME_SCHEMA.names, f.row(), strict=True))
    row["stream_id"] = name
    row.update(values)
    return row


@dataclass(frozen=True)
class DeadLetter:
    """A DLQ record's source, reason and value."""

    offset: int
    row: int
    reason: str
    value: bytes
    headers: dict[str, bytes]


def dead_letters(
    kafka_settings: KafkaSettings, topic: str, expected: int, committed_only: bool = False
) -> list[DeadLetter]:
    """Every record of a DLQ topic, as DeadLetters."""
    out = []
    for record in read_topic(kafka_settings, topic, expected, committed_only):
        headers = dict(record.headers)
        out.append(
            DeadLetter(
                int(headers["source.offset"]),
                int(headers["source.row"]),
                headers["error.reason"].decode(),
                record.value or b"",
                headers,
            )
        )
    return out
