"""The in-process floor: a hand-written confluent-kafka consumer with LiteRT in the same process.

The least a pipeline can do on one machine: poll what has arrived (up to --batch messages),
decode, classify in one interpreter call, produce a label per frame, and commit a batch's
offsets once every label of it (and of every batch before it) is acknowledged - at-least-once
without waiting on the broker between batches. Runs in framecast's own .venv. Interface:
peers/README.md.
"""

from __future__ import annotations

import signal
import sys
from collections import deque
from functools import partial
from typing import Any

import common  # peers/common.py: a script's own directory is on sys.path
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition


class Pending:
    """One consumed batch: its labels not yet acknowledged, and the offsets it completes."""

    __slots__ = ("failed", "offsets", "unacked")

    def __init__(self, offsets: dict[tuple[str, int], int]) -> None:
        self.offsets = offsets
        self.unacked = 0
        self.failed: str | None = None


def delivered(batch: Pending, error: KafkaError | None, _message: Any) -> None:
    batch.unacked -= 1
    if error is not None:
        batch.failed = error.str()


def main() -> None:
    args = common.kafka_arguments(__doc__.splitlines()[0])
    model = common.Model(args.model, args.threads, args.batch)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap, "group.id": args.group,
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,  # framecast's fetch_wait_ms
    })
    # Labels go out as framecast's do: idempotent (acks=all), 10 ms linger, murmur2 keys.
    producer = Producer({
        "bootstrap.servers": args.bootstrap, "enable.idempotence": True, "linger.ms": 10,
        "partitioner": "murmur2_random",
    })
    assigned = []

    def on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions and not assigned:
            assigned.append(True)
            common.ready()

    consumer.subscribe([args.frames], on_assign=on_assign)
    batches: deque[Pending] = deque()
    produced = skipped = 0

    def settle(wait: bool = False) -> None:
        """Commit the offsets of the acknowledged batches at the head of the queue."""
        offsets: dict[tuple[str, int], int] = {}
        while batches and batches[0].unacked == 0:
            batch = batches.popleft()
            if batch.failed is not None:
                sys.exit(f"a label was not delivered ({batch.failed}): nothing committed past it")
            offsets.update(batch.offsets)
        if offsets:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                            asynchronous=not wait)

    while produced < args.max_frames and not stopping:
        first = consumer.poll(0.1)
        producer.poll(0)
        settle()
        if first is None:
            continue
        consumed_ns = common.now_ns()
        frames: list[common.Frame] = []
        offsets: dict[tuple[str, int], int] = {}
        for message in [first, *consumer.consume(args.batch - 1, 0)]:
            if message.error() is not None:
                print(f"consumer: {message.error()}", file=sys.stderr)
                continue
            topic, part, offset = message.topic(), message.partition(), message.offset()
            offsets[(topic, part)] = offset + 1
            try:
                frames += common.parse_message(
                    message.value(), message.headers(), message.key(), topic, part, offset,
                    message.timestamp()[1], consumed_ns)
            except common.BadFrame:
                skipped += 1
        labelled, bad = model.label_frames(frames)
        skipped += bad
        batch = Pending(offsets)
        batches.append(batch)
        for frame, record in labelled:
            while True:
                try:
                    producer.produce(args.labels, common.encode(record), frame.stream_id.encode(),
                                     on_delivery=partial(delivered, batch))
                    break
                except BufferError:
                    producer.poll(0.05)
            batch.unacked += 1
        produced += len(labelled)
        producer.poll(0)
    # 1. every label acknowledged, 2. then the offsets of what they label committed.
    left = producer.flush(60)
    settle(wait=True)
    labelled = produced - left
    consumer.close()
    common.finish(labelled, skipped=skipped)


if __name__ == "__main__":
    main()
