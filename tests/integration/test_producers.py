"""`framecast produce` against a real Kafka broker: what lands in the frames topic."""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from serving.fashion_mnist import load_fashion_mnist
from serving.preprocess import DecodeLimits, decode_frame, decode_image
from streams.client import admin_client
from streams.config import KafkaSettings, TopicSettings
from streams.frames import ARROW_CONTENT_TYPE, FrameRecord, decode_frames
from streams.producers import ProducerError, produce_frames
from streams.topics import describe_topics
from tests.conftest import run_cli
from tests.kafka_python import kafka_python_config
from tests.unit.test_producers import write_video

LIMITS = DecodeLimits()


def _topic() -> str:
    return f"frames-{uuid.uuid4().hex[:10]}"


def read_topic(settings: KafkaSettings, topic: str) -> list[Any]:
    """Every record of topic, partition by partition in offset order (end offsets checked)."""
    consumer = KafkaConsumer(
        **kafka_python_config(settings), enable_auto_commit=False, consumer_timeout_ms=10_000
    )
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    end = consumer.end_offsets(partitions)
    records: list[Any] = []
    for tp in partitions:
        consumer.pause(*[p for p in partitions if p != tp])
        consumer.resume(tp)
        while consumer.position(tp) < end[tp]:
            batch = consumer.poll(timeout_ms=2_000).get(tp, [])
            assert batch or consumer.position(tp) >= end[tp], f"no records from {tp}"
            records += batch
    consumer.close()
    assert len(records) == sum(end.values())
    return records


def frames_by_stream(records: list[Any]) -> dict[str, list[FrameRecord]]:
    """Arrow messages decoded, grouped by key, in offset order; keys must match stream_id."""
    streams: dict[str, list[FrameRecord]] = defaultdict(list)
    for record in records:
        assert record.headers == [("content-type", ARROW_CONTENT_TYPE.encode())]
        frames = decode_frames(record.value)
        assert {f.stream_id for f in frames} == {record.key.decode()}
        streams[record.key.decode()] += frames
    return dict(streams)


def produce(settings: KafkaSettings, **options: Any) -> dict[str, Any]:
    """produce_frames with fast defaults (no pacing), to a fresh topic unless given one."""
    options = {"fps": 0.0, "streams": 3, "count": 12, "encoding": "jpeg", **options}
    options.setdefault("topic", _topic())
    options.setdefault("source", "synthetic")
    return produce_frames(settings, None, **options)


@pytest.fixture(scope="module")
def test_set() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test images and labels."""
    return load_fashion_mnist("test")


@pytest.mark.parametrize(("encoding", "batch"), [("jpeg", 1), ("png", 5), ("raw", 12)])
def test_synthetic_frames_arrive_in_order_per_stream_with_labels(
    kafka_settings: KafkaSettings, test_set, encoding: str, batch: int
) -> None:
    from streams.video import SyntheticVideo

    before = time.time_ns()
    summary = produce(kafka_settings, encoding=encoding, batch=batch, seed=5)
    after = time.time_ns()
    assert summary["frames"] == 36 and summary["streams"] == 3
    assert summary["messages"] == 3 * -(-12 // batch)
    streams = frames_by_stream(read_topic(kafka_settings, summary["topic"]))
    assert sorted(streams) == ["cam-0", "cam-1", "cam-2"] == sorted(summary["stream_ids"])
    images, labels = test_set
    for k in range(3):
        frames = streams[f"cam-{k}"]
        assert [f.frame_index for f in frames] == list(range(12))
        clip = SyntheticVideo(images, labels, stream_index=k, seed=5)
        stamps = [f.captured_at_ns for f in frames]
        assert stamps == sorted(stamps) and before <= stamps[0] and stamps[-1] <= after
        for frame in frames:
            expected = clip.frame(frame.frame_index)
            assert frame.label == expected.label is not None
            assert (frame.encoding, frame.height, frame.width, frame.channels) == (
                encoding,
                32,
                32,
                1,
            )
            pixels = decode_frame(frame, LIMITS)[:, :, 0].astype(np.int16)
            error = np.abs(pixels - expected.pixels).mean()
            assert error == 0 if encoding != "jpeg" else error < 4


def test_fashion_mnist_replay_sends_the_test_images_with_their_labels(
    kafka_settings: KafkaSettings, test_set
) -> None:
    summary = produce(kafka_settings, source="fashion-mnist", encoding="raw", streams=2, count=9)
    streams = frames_by_stream(read_topic(kafka_settings, summary["topic"]))
    images, labels = test_set
    for k in range(2):
        frames = streams[f"cam-{k}"]
        assert [f.frame_index for f in frames] == list(range(9))
        for i, frame in enumerate(frames):
            position = k * 1000 + i
            assert frame.label == int(labels[position])
            assert (frame.height, frame.width, frame.channels) == (28, 28, 1)
            assert frame.data == images[position].tobytes()


def test_bare_images_carry_their_metadata_in_headers(
    kafka_settings: KafkaSettings, test_set
) -> None:
    summary = produce(
        kafka_settings,
        source="fashion-mnist",
        encoding="png",
        message_format="bare",
        streams=2,
        count=6,
    )
    assert summary["messages"] == summary["frames"] == 12
    records = read_topic(kafka_settings, summary["topic"])
    images, labels = test_set
    seen: dict[str, list[int]] = defaultdict(list)
    for record in records:
        headers = dict(record.headers)
        assert [name for name, _ in record.headers] == [
            "content-type",
            "stream_id",
            "frame_index",
            "captured_at_ns",
            "label",
        ]
        assert headers["content-type"] == b"image/png"
        stream_id = headers["stream_id"].decode()
        assert record.key.decode() == stream_id
        index = int(headers["frame_index"])
        position = int(stream_id.removeprefix("cam-")) * 1000 + index
        assert int(headers["label"]) == int(labels[position])
        assert int(headers["captured_at_ns"]) > 0
        pixels = decode_image(record.value, "png", LIMITS)
        assert np.array_equal(pixels[:, :, 0], images[position])
        seen[stream_id].append(index)
    assert seen == {"cam-0": list(range(6)), "cam-1": list(range(6))}


def test_video_file_frames_are_sampled_resized_jpeg_without_labels(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    clip = write_video(tmp_path / "clip.mp4", 20, width=96, height=64)  # 25 fps, levels 10*i
    summary = produce(
        kafka_settings, source=str(clip), fps=12.5, streams=2, count=6, max_side=48, batch=2
    )
    assert summary["source"] == str(clip) and summary["frames"] == 12
    streams = frames_by_stream(read_topic(kafka_settings, summary["topic"]))
    for frames in streams.values():
        assert [f.frame_index for f in frames] == list(range(6))
        for frame in frames:
            assert frame.label is None and frame.encoding == "jpeg"
            assert (frame.height, frame.width, frame.channels) == (32, 48, 3)
            level = decode_frame(frame, LIMITS).mean()
            assert abs(level - 20 * frame.frame_index) < 4  # every other frame at 12.5 fps


def test_missing_topic_is_created_with_the_spec_defaults_and_reused(
    kafka_settings: KafkaSettings,
) -> None:
    topic = _topic()
    specs = TopicSettings(partitions=3, max_message_bytes=4 * 1024 * 1024)
    first = produce(kafka_settings, topic=topic, topic_settings=specs, streams=1, count=2)
    again = produce(kafka_settings, topic=topic, topic_settings=specs, streams=1, count=2)
    assert (first["topic_created"], again["topic_created"]) == (True, False)
    with admin_client(kafka_settings) as admin:
        (described,) = describe_topics(admin, [topic])
    assert described["partitions"] == 3
    assert described["config"]["max.message.bytes"] == str(4 * 1024 * 1024)
    assert len(read_topic(kafka_settings, topic)) == 4


def test_a_frame_over_the_message_limit_is_reported_not_lost_silently(
    kafka_settings: KafkaSettings,
) -> None:
    with pytest.raises(ProducerError, match="too large for"):
        produce(
            kafka_settings,
            encoding="raw",
            frame_size=400,
            streams=1,
            count=1,
            topic_settings=TopicSettings(max_message_bytes=64 * 1024),
        )


def test_cli_produce_prints_a_summary_and_refuses_bad_options(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    topic = _topic()
    env = {"FRAMECAST_KAFKA_BOOTSTRAP": str(kafka_settings.bootstrap_servers)}
    args = ["--source", "synthetic", "--topic", topic, "--streams", "2", "--count", "5"]
    result = run_cli("produce", *args, "--fps", "0", "--json", home=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["frames"], summary["messages"], summary["topic"]) == (10, 10, topic)
    assert len(read_topic(kafka_settings, topic)) == 10
    text = run_cli("produce", *args, "--fps", "50", "--batch", "5", home=tmp_path, env=env)
    assert text.returncode == 0, text.stderr
    assert "produced 10 frames from 2 stream(s) of synthetic" in text.stdout
    assert "2 messages" in text.stdout
    bad = run_cli("produce", *args, "--format", "bare", "--encoding", "raw", home=tmp_path, env=env)
    assert bad.returncode == 2 and "not --encoding raw" in bad.stderr
    missing = run_cli("produce", "--source", str(tmp_path / "nope.mp4"), home=tmp_path, env=env)
    assert missing.returncode == 1 and "neither synthetic nor fashion-mnist" in missing.stderr
