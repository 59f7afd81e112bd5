"""Bytewax 0.21: a dataflow with the model in process, run as `python -m bytewax.run` runs one.

``op.input`` from Bytewax's KafkaSource, ``op.flat_map_batch`` classifying each batch the
source hands over in one interpreter call (its documented way to batch), and a sink that
produces the labels. Bytewax keeps offsets in its own recovery store, not in a consumer group;
to honour the peers' interface (--group, commit after delivery) the source reads from the
group's committed offsets (OFFSET_STORED, earliest when none) and the sink, like Bytewax's
KafkaSink, produces a batch and flushes it, then commits that batch's offsets to the group -
at-least-once. Runs in .venv-peers/bytewax (peers/requirements-bytewax.txt). Interface:
peers/README.md.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime
from typing import Any

import bytewax.operators as op
import common  # peers/common.py: a script's own directory is on sys.path
from bytewax._bytewax import cli_main
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.inputs import StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_STORED, Consumer, KafkaError, Producer, TopicPartition

STOP = threading.Event()  # set once N labels are delivered, or on SIGTERM
Label = tuple[bytes, bytes, tuple[str, int, int]]  # key, value, (topic, partition, offset)


class StoppablePartition(StatefulSourcePartition[Any, Any]):
    """A Kafka partition of the source that ends when STOP is set (Bytewax has no stop call)."""

    def __init__(self, inner: StatefulSourcePartition[Any, Any]) -> None:
        self.inner = inner

    def next_batch(self) -> list[Any]:
        if STOP.is_set():
            raise StopIteration
        return list(self.inner.next_batch())

    def next_awake(self) -> datetime | None:
        return self.inner.next_awake()

    def snapshot(self) -> Any:
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


class GroupSource(KafkaSource):
    """KafkaSource reading from a consumer group's committed offsets; READY once every
    partition is open."""

    def __init__(self, bootstrap: str, topic: str, group: str, batch: int) -> None:
        super().__init__(
            [bootstrap], [topic], starting_offset=OFFSET_STORED, batch_size=batch,
            add_config={"group.id": group, "auto.offset.reset": "earliest"},
        )
        self.expected = self.built = 0

    def list_parts(self) -> list[str]:
        parts = super().list_parts()
        self.expected = len(parts)
        return parts

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> Any:
        part = StoppablePartition(super().build_part(step_id, for_part, resume_state))
        self.built += 1
        if self.built == self.expected:
            common.ready()
        return part


class CommitPartition(StatelessSinkPartition[Label]):
    """Produce a batch of labels, flush, then commit the offsets they label."""

    def __init__(self, bootstrap: str, topic: str, group: str, max_frames: int) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap})
        self.committer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                   "enable.auto.commit": False})
        self.topic, self.max_frames = topic, max_frames
        self.labelled = 0
        self.failed: list[str] = []

    def _delivered(self, error: KafkaError | None, _message: Any) -> None:
        if error is not None:
            self.failed.append(error.str())

    def write_batch(self, items: list[Label]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for key, value, (topic, partition, offset) in items:
            while True:
                try:
                    self.producer.produce(self.topic, value, key, on_delivery=self._delivered)
                    break
                except BufferError:
                    self.producer.poll(0.05)
            self.producer.poll(0)
            offsets[(topic, partition)] = max(offsets.get((topic, partition), 0), offset + 1)
        # 1. every label acknowledged (Bytewax's KafkaSink flushes each batch too) ...
        if self.producer.flush(60) or self.failed:
            raise RuntimeError(f"labels not delivered: {self.failed[:1]}; nothing committed")
        # 2. ... then the offsets of the frames they label.
        self.committer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
            asynchronous=False,
        )
        self.labelled += len(items)
        if self.labelled >= self.max_frames:
            STOP.set()

    def close(self) -> None:
        self.producer.flush(60)
        self.committer.close()


class CommitSink(DynamicSink[Label]):
    def __init__(self, bootstrap: str, topic: str, group: str, max_frames: int) -> None:
        self.args = (bootstrap, topic, group, max_frames)
        self.partitions: list[CommitPartition] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> CommitPartition:
        partition = CommitPartition(*self.args)
        self.partitions.append(partition)
        return partition


def main() -> None:
    args = common.kafka_arguments(__doc__.splitlines()[0])
    model = common.Model(args.model, args.threads, args.batch)
    skipped = [0]

    def classify(messages: list[KafkaSourceMessage[Any, Any]]) -> list[Label]:
        consumed_ns = common.now_ns()
        frames: list[common.Frame] = []
        for m in messages:
            try:
                frames += common.parse_message(m.value, m.headers, m.key, m.topic, m.partition,
                                               m.offset, m.timestamp[1], consumed_ns)
            except common.BadFrame:
                skipped[0] += 1
        labelled, bad = model.label_frames(frames)
        skipped[0] += bad
        return [
            (frame.stream_id.encode(), common.encode(record),
             (frame.topic, frame.partition, frame.offset))
            for frame, record in labelled
        ]

    flow = Dataflow("framecast-peer")
    frames = op.input("frames", flow, GroupSource(args.bootstrap, args.frames, args.group,
                                                  args.batch))
    labels = op.flat_map_batch("classify", frames, classify)
    sink = CommitSink(args.bootstrap, args.labels, args.group, args.max_frames)
    op.output("labels", labels, sink)
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    cli_main(flow, workers_per_process=1)
    common.finish(sum(p.labelled for p in sink.partitions), skipped=skipped[0])


if __name__ == "__main__":
    main()
