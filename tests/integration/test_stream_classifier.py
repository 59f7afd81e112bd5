"""The stream classifier against a real broker and a real Serve app: nothing lost, nothing faked."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from PIL import Image

from cluster.processes import wait_until
from serving.frames import ARROW_CONTENT_TYPE
from serving.runtimes import LiteRTRuntime
from streams.classifier import StreamClassifier
from streams.config import KafkaSettings
from streams.latency import LatencyRecord
from streams.serve_client import serve_classify_fn
from tests.kafka_python import kafka_python_config
from tests.streaming import (
    IMAGES,
    LABELS,
    BackgroundClassifier,
    Feeder,
    LabelProbe,
    classifier,
    committed_offsets,
    labels_of,
    producer,
    read_topic,
    run_classifier,
    send_arrow_frames,
    set_max_message_bytes,
    stream_run_argv,
    stream_run_env,
    topics,
    wait_for_start,
)


def test_every_frame_gets_one_label_in_per_stream_order(
    kafka_settings: KafkaSettings, stream_app: str, served_artifact: Path
) -> None:
    config = topics(kafka_settings)
    sent = send_arrow_frames(kafka_settings, config.frames_topic, streams=3, per_stream=40)
    totals = run_classifier(kafka_settings, config, stream_app)
    assert totals["labelled"] == 120
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 120))
    assert len(labels) == 120
    assert len({(lab.source.partition, lab.source.offset) for lab in labels}) == 120
    for stream in ("cam-0", "cam-1", "cam-2"):
        indices = [lab.frame_index for lab in labels if lab.stream_id == stream]
        assert indices == list(range(40))
    direct = (
        LiteRTRuntime(served_artifact / "model.tflite")
        .predict(IMAGES[:, :, :, None] / np.float32(255))
        .argmax(axis=1)
    )
    rows = {(s, i): row for s, i, row in sent}
    for label in labels:
        row = rows[(label.stream_id, label.frame_index)]
        assert label.class_id == int(direct[row])
        assert label.ground_truth == int(LABELS[row])
        assert label.status == "ok"
        assert label.timings_ms["end_to_end"] >= label.timings_ms["inference"] >= 0
    aggregates = [
        LatencyRecord.model_validate_json(r.value)
        for r in read_topic(kafka_settings, config.latency_topic, 1)
    ]
    assert sum(a.frames for a in aggregates) == 120
    assert all(a.consumer == config.consumer_id for a in aggregates)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bare_images_from_a_plain_producer_and_malformed_frames_go_to_dlq(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    config = topics(kafka_settings, partitions=1)
    p = producer(kafka_settings)
    now = str(time.time_ns()).encode()

    def bare(value: bytes, index: int, content_type: bytes = b"image/png", **extra: bytes) -> None:
        headers = [
            ("content-type", content_type),
            ("stream_id", b"cam-x"),
            ("frame_index", str(index).encode()),
            ("captured_at_ns", now),
            *extra.items(),
        ]
        p.send(config.frames_topic, key=b"cam-x", value=value, headers=headers)

    jpeg = io.BytesIO()
    Image.fromarray(np.stack([IMAGES[0]] * 3, axis=2)).save(jpeg, format="JPEG")
    wrong_schema = io.BytesIO()
    import pyarrow as pa

    table = pa.table({"stream_id": ["cam-x"], "pixels": [b"x"]})
    with pa.ipc.new_stream(wrong_schema, table.schema) as writer:
        writer.write_table(table)

    bare(_png(IMAGES[1]), 0, label=str(int(LABELS[1])).encode())  # good
    bare(os.urandom(300), 1)  # random bytes
    bare(jpeg.getvalue()[:300], 2, b"image/jpeg")  # truncated JPEG
    p.send(
        config.frames_topic,
        key=b"cam-x",
        value=wrong_schema.getvalue(),
        headers=[("content-type", ARROW_CONTENT_TYPE.encode())],
    )  # wrong Arrow schema
    p.send(
        config.frames_topic, key=b"cam-x", value=b"", headers=[("content-type", b"image/png")]
    )  # empty value
    p.send(
        config.frames_topic,
        key=b"cam-x",
        value=_png(IMAGES[2]),
        headers=[("content-type", b"image/png")],
    )  # missing headers
    bare(_png(IMAGES[3]), 6)  # good
    p.flush()
    p.close()

    totals = run_classifier(kafka_settings, config, stream_app)
    assert totals["labelled"] == 2
    assert totals["dlq"] == 5
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 2))
    assert [(lab.frame_index, lab.source.offset) for lab in labels] == [(0, 0), (6, 6)]
    assert labels[0].ground_truth == int(LABELS[1])
    dlq = read_topic(kafka_settings, config.dlq_topic, 5)
    reasons = {
        int(dict(r.headers)["source.offset"]): dict(r.headers)["error.reason"].decode() for r in dlq
    }
    assert reasons == {
        1: "undecodable",
        2: "undecodable",
        3: "bad_arrow",
        4: "empty_value",
        5: "bad_headers",
    }
    for record in dlq:
        headers = dict(record.headers)
        assert headers["source.topic"].decode() == config.frames_topic
        assert headers["source.partition"] == b"0"
        assert headers["error.class"]
        assert record.key == b"cam-x"


def test_exactly_once_gives_exactly_one_committed_label_per_frame(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    config = topics(kafka_settings).model_copy(update={"guarantee": "exactly-once"})
    send_arrow_frames(kafka_settings, config.frames_topic, streams=2, per_stream=30)
    totals = run_classifier(kafka_settings, config, stream_app)
    assert totals["labelled"] == 60
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 60, committed_only=True))
    keys = [(lab.stream_id, lab.frame_index) for lab in labels]
    assert len(keys) == 60
    assert len(set(keys)) == 60


def test_exactly_once_labels_become_visible_only_with_their_offsets(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    """Latency aggregates commit transactions of their own, every window; the labels in that
    transaction must commit with their offsets, or a new owner of the partition (after a
    rebalance or a crash) labels those frames again and read_committed sees two labels.
    Offsets here are never committed on the interval (10 min), only with the aggregates."""
    config = topics(kafka_settings, partitions=2).model_copy(
        update={
            "guarantee": "exactly-once",
            "commit_interval_ms": 600_000,
            "latency_window_s": 0.3,
            "idle_exit_s": None,
        }
    )
    send_arrow_frames(kafka_settings, config.frames_topic, streams=2, per_stream=20)
    member = BackgroundClassifier(classifier(kafka_settings, config, stream_app))
    member.start()
    try:
        assert wait_until(lambda: member.member.totals["labelled"] >= 40, timeout=120)
        assert wait_until(lambda: member.member.totals["latency_windows"] >= 3, timeout=60)
        visible = labels_of(
            read_topic(kafka_settings, config.labels_topic, 40, committed_only=True)
        )
        probe = KafkaConsumer(
            **kafka_python_config(kafka_settings),
            group_id=config.group,
            isolation_level="read_committed",  # offset fetches wait for open transactions
        )
        committed = {
            p: probe.committed(TopicPartition(config.frames_topic, p)) or 0 for p in (0, 1)
        }
        probe.close()
    finally:
        member.member.stop()
    member.finish()
    assert len(visible) == 40
    uncovered = [
        (lab.source.partition, lab.source.offset)
        for lab in visible
        if lab.source.offset >= committed.get(lab.source.partition, 0)
    ]
    assert uncovered == [], f"committed labels of uncommitted frames (offsets {committed})"


def test_frames_past_their_deadline_are_labelled_dropped_and_counted(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    # 60 s old against a 30 s deadline: dropped. The 3 fresh frames have 30 s to be consumed -
    # with a 1 s deadline, a classifier slow to join its group on a loaded machine (CI beside
    # a training) dropped them too (8 == 5).
    config = topics(kafka_settings, partitions=1).model_copy(update={"deadline_ms": 30_000})
    send_arrow_frames(
        kafka_settings,
        config.frames_topic,
        streams=1,
        per_stream=5,
        captured_at_ns=time.time_ns() - 60 * 10**9,
    )
    send_arrow_frames(kafka_settings, config.frames_topic, streams=1, per_stream=3)
    totals = run_classifier(kafka_settings, config, stream_app)
    assert totals["dropped_deadline"] == 5
    assert totals["labelled"] == 3
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 8))
    assert [lab.status for lab in labels] == ["dropped_deadline"] * 5 + ["ok"] * 3
    assert all(lab.class_id is None for lab in labels[:5])
    aggregates = [
        LatencyRecord.model_validate_json(r.value)
        for r in read_topic(kafka_settings, config.latency_topic, 1)
    ]
    assert sum(a.dropped_deadline for a in aggregates) == 5


def test_classifier_killed_mid_stream_and_restarted_leaves_no_frame_unlabelled(
    kafka_settings: KafkaSettings, stream_app: str, ray_head: Any, tmp_path: Path
) -> None:
    config = topics(kafka_settings)
    argv = stream_run_argv(
        kafka_settings, config, stream_app, ray_head, tmp_path, "--max-batch", "16"
    )
    env = stream_run_env()
    # Frames keep arriving (3 x 100 fps for 10 s) while the first classifier is killed.
    feeder = Feeder(kafka_settings, config.frames_topic, streams=3, per_stream=1000, fps=100.0)
    probe = LabelProbe(kafka_settings, config.labels_topic)
    log = tmp_path / "first.log"
    try:
        with log.open("wb") as log_handle:
            # A long idle exit for the first one: it must still be there to be killed.
            first = subprocess.Popen(
                [*argv[:-1], "60"], env=env, stdout=log_handle, stderr=subprocess.STDOUT
            )
            try:
                # Frames start once it consumes (its start-up takes seconds on a busy machine):
                # no backlog, so the kill lands mid-stream with frames still to come.
                wait_for_start(first, log)
                feeder.start()
                # Kill it hard once labels flow and it has committed some of them: mid-stream,
                # with committed offsets to resume from and uncommitted work in hand.
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and first.poll() is None:
                    probe.wait_for(300, timeout_s=1)
                    if probe.seen >= 300 and committed_offsets(kafka_settings, config.group) > 0:
                        break
                seen = probe.seen
            finally:
                first.send_signal(signal.SIGKILL)
                first.wait(30)
        expected = feeder.finish()
    finally:
        feeder.stop_event.set()
        probe.close()
    assert seen >= 300, log.read_text()[-2000:]
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, len(expected)))
    got = {(lab.stream_id, lab.frame_index) for lab in labels}
    assert got == expected  # no frame lost
    resumed = json.loads(second.stdout.strip().splitlines()[-1])
    # resumed from the committed offsets
    assert 0 < resumed["labelled"] < len(expected), log.read_text()[-3000:]
    # At-least-once: duplicates are only the frames labelled but not yet committed.
    assert len(labels) - len(expected) <= len(expected) - resumed["labelled"]


def test_two_classifiers_in_one_group_share_the_partitions(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    import threading

    config = topics(kafka_settings, partitions=4).model_copy(update={"idle_exit_s": 6.0})
    sent = send_arrow_frames(kafka_settings, config.frames_topic, streams=8, per_stream=40)
    outcomes: list[dict[str, Any]] = []
    classifiers = []
    for member in ("a", "b"):
        classify, retriable = serve_classify_fn(stream_app)
        classifiers.append(
            StreamClassifier(
                kafka_settings,
                str(kafka_settings.bootstrap_servers),
                config.model_copy(update={"consumer_id": f"member-{member}"}),
                classify,
                retriable,
            )
        )
    threads = [threading.Thread(target=lambda c=c: outcomes.append(c.run())) for c in classifiers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == 2
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, len(sent)))
    assert {(lab.stream_id, lab.frame_index) for lab in labels} == {(s, i) for s, i, _ in sent}
    assert sum(o["labelled"] for o in outcomes) == len(labels)


def test_labels_a_topic_can_never_take_go_to_the_dlq_and_are_committed(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    """A labels topic that refuses every label (max.message.bytes below one): a refusal
    that can never succeed is not retried forever (issue 17). Each frame goes to the DLQ as
    ``label_refused`` and its offset is committed; nothing is lost, nothing re-read."""
    config = topics(kafka_settings, partitions=1)
    set_max_message_bytes(kafka_settings, config.labels_topic, 64)  # a label is ~460 bytes
    send_arrow_frames(kafka_settings, config.frames_topic, streams=2, per_stream=10)
    first = run_classifier(kafka_settings, config, stream_app)  # returns: no endless rewind
    # (its totals also count the 20 labels of the first pass, the ones refused)
    assert first["dlq"] == 20
    assert read_topic(kafka_settings, config.labels_topic, 0, settle_s=1) == []
    dlq = read_topic(kafka_settings, config.dlq_topic, 20)
    assert sorted(int(dict(r.headers)["source.offset"]) for r in dlq) == list(range(20))
    assert {dict(r.headers)["error.reason"] for r in dlq} == {b"label_refused"}
    assert committed_offsets(kafka_settings, config.group) == 20
    # Done means done: a topic that takes labels again does not make them re-read.
    set_max_message_bytes(kafka_settings, config.labels_topic, 1024 * 1024)
    second = run_classifier(kafka_settings, config, stream_app)
    assert second["labelled"] == 0 and second["dlq"] == 0


def test_labels_the_brokers_refuse_for_now_are_never_committed_as_done(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    """A labels topic that is missing (deleted; the broker does not auto-create topics):
    a transient refusal. Nothing is committed past the unlabelled frames while it is away;
    once it exists again every frame is labelled and committed."""
    from confluent_kafka.admin import AdminClient, NewTopic

    config = topics(kafka_settings, partitions=1).model_copy(update={"idle_exit_s": None})
    admin = AdminClient(kafka_settings.rdkafka_config())
    admin.delete_topics([config.labels_topic])[config.labels_topic].result(30)
    send_arrow_frames(kafka_settings, config.frames_topic, streams=2, per_stream=10)
    member = BackgroundClassifier(classifier(kafka_settings, config, stream_app))
    member.start()
    try:
        held = []
        for _ in range(6):  # the topic stays away for ~6 s of the classifier's work
            time.sleep(1)
            held.append(committed_offsets(kafka_settings, config.group))
        deadline = time.monotonic() + 60
        while True:  # the deletion may still be under way
            try:
                admin.create_topics([NewTopic(config.labels_topic, 1, 1)])[
                    config.labels_topic
                ].result(30)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert wait_until(lambda: committed_offsets(kafka_settings, config.group) == 20, 180)
    finally:
        member.member.stop()
    totals = member.finish()
    assert held == [0] * len(held), held
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 20))
    assert {(lab.stream_id, lab.frame_index) for lab in labels} == {
        (f"cam-{s}", i) for s in range(2) for i in range(10)
    }
    assert totals["dlq"] == 0


def test_a_backlog_is_cut_into_serve_calls_of_at_most_max_batch_frames(
    kafka_settings: KafkaSettings, stream_app: str
) -> None:
    # One poll of a backlog returns every message at once; the classifier must still call
    # Serve with micro-batches (so inference overlaps labelling), not with the whole backlog.
    config = topics(kafka_settings).model_copy(update={"max_batch_frames": 16})
    send_arrow_frames(kafka_settings, config.frames_topic, streams=2, per_stream=60)
    classify, retriable = serve_classify_fn(stream_app)
    sizes: list[int] = []

    def recording(frames: list[Any]) -> Any:
        sizes.append(len(frames))
        return classify(frames)

    member = StreamClassifier(
        kafka_settings, str(kafka_settings.bootstrap_servers), config, recording, retriable
    )
    totals = member.run()
    assert totals["labelled"] == 120
    assert sum(sizes) == 120
    assert max(sizes) <= 16, sizes
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 120))
    for stream in ("cam-0", "cam-1"):
        assert [lab.frame_index for lab in labels if lab.stream_id == stream] == list(range(60))
