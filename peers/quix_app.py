"""Quix Streams 3.x: an Application with the model in process, the way its docs show.

A StreamingDataFrame over the frames topic (bytes in), one ``apply`` that classifies the
frames of a message (expanded to one label each), ``to_topic`` the labels topic (JSON out).
Quix commits on its own checkpoints (every 5 s by default): the producer is flushed first,
then the offsets are committed - at-least-once. Quix runs a message at a time, so a model call
holds the frames of one message (one for bare images, the rows of an Arrow message). Runs in
.venv-peers/quix (peers/requirements-quix.txt). Interface: peers/README.md.
"""

from __future__ import annotations

from typing import Any

import common  # peers/common.py: a script's own directory is on sys.path
from quixstreams import Application, message_context


class ReadyApplication(Application):
    """An Application that says READY on stderr once it owns partitions (the harness waits
    for it before the cameras start); Quix has no public hook for assignment."""

    _said_ready = False

    def _on_assign(self, _: Any, topic_partitions: list[Any]) -> None:
        super()._on_assign(_, topic_partitions)
        if topic_partitions and not self._said_ready:
            self._said_ready = True
            common.ready()


def main() -> None:
    args = common.kafka_arguments(__doc__.splitlines()[0])
    model = common.Model(args.model, args.threads, args.batch)
    app = ReadyApplication(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        loglevel="WARNING",
    )
    frames_topic = app.topic(args.frames, key_deserializer="bytes", value_deserializer="bytes")
    labels_topic = app.topic(args.labels, key_serializer="bytes", value_serializer="json")
    counts = {"labelled": 0, "skipped": 0}

    def classify(value: bytes, key: bytes | None, timestamp_ms: int,
                 headers: Any) -> list[dict[str, Any]]:
        consumed_ns = common.now_ns()
        context = message_context()
        try:
            frames = common.parse_message(value, headers, key, context.topic, context.partition,
                                          context.offset, timestamp_ms, consumed_ns)
        except common.BadFrame:
            counts["skipped"] += 1
            return []
        labelled, bad = model.label_frames(frames)
        counts["skipped"] += bad
        labels = [record for _frame, record in labelled]
        counts["labelled"] += len(labels)
        if counts["labelled"] >= args.max_frames:
            app.stop()  # the loop ends after this message; its checkpoint is committed
        return labels

    sdf = app.dataframe(frames_topic)
    sdf = sdf.apply(classify, metadata=True, expand=True)
    sdf.to_topic(labels_topic)
    app.run()  # SIGTERM stops it too (Quix's own handler): a last checkpoint, then return
    common.finish(counts["labelled"], skipped=counts["skipped"])


if __name__ == "__main__":
    main()
