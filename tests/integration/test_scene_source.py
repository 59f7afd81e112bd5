"""`framecast produce --source scenes` into the session's Kafka broker: sizes, encodings, labels."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from streams.config import KafkaSettings
from streams.frames import FrameRecord
from streams.scene_source import ScenesVideo
from tests.conftest import run_cli
from tests.integration.test_producers import _topic, frames_by_stream, read_topic

SIZE = (320, 240)
COUNT = 12


def _produce(kafka_settings: KafkaSettings, home: Path, topic: str, *options: str) -> dict:
    env = {"FRAMECAST_KAFKA_BOOTSTRAP": str(kafka_settings.bootstrap_servers)}
    result = run_cli("produce", "--source", "scenes", "--frame-size", "320x240", "--topic",
                     topic, "--streams", "2", "--count", str(COUNT), "--fps", "0", "--json",
                     *options, home=home, env=env)
    assert result.returncode == 0, result.stderr
    summary: dict = json.loads(result.stdout)
    return summary


def _expected_labels(camera: int) -> list[int | None]:
    video = ScenesVideo(size=SIZE, stream_index=camera)
    return [video.frame(t).label for t in range(COUNT)]


def test_cli_produces_scenes_as_jpeg_arrow_records_with_ground_truth(
        kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    topic = _topic()
    summary = _produce(kafka_settings, tmp_path, topic, "--encoding", "jpeg")
    assert (summary["source"], summary["frames"], summary["encoding"]) == ("scenes", 24, "jpeg")
    assert summary["prerender_s"] > 0 and summary["cpu_s"] >= 0
    streams = frames_by_stream(read_topic(kafka_settings, topic))
    assert sorted(streams) == ["cam-0", "cam-1"]
    for camera, stream_id in enumerate(("cam-0", "cam-1")):
        frames: list[FrameRecord] = streams[stream_id]
        assert [f.frame_index for f in frames] == list(range(COUNT))
        assert {(f.encoding, f.width, f.height, f.channels) for f in frames} == {
            ("jpeg", 320, 240, 3)}
        assert [f.label for f in frames] == _expected_labels(camera)
        with Image.open(io.BytesIO(frames[5].data)) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", SIZE, "RGB")


def test_cli_produces_scenes_as_bare_png_with_label_headers(
        kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    topic = _topic()
    summary = _produce(kafka_settings, tmp_path, topic, "--encoding", "png", "--format", "bare")
    assert summary["frames"] == 24
    records = read_topic(kafka_settings, topic)
    by_camera: dict[str, list] = {}
    for record in records:
        by_camera.setdefault(record.key.decode(), []).append(record)
    video = ScenesVideo(size=SIZE, stream_index=1)
    for camera, stream_id in enumerate(("cam-0", "cam-1")):
        headers = [dict(r.headers) for r in by_camera[stream_id]]
        assert {h["content-type"] for h in headers} == {b"image/png"}
        assert [int(h["label"]) for h in headers] == _expected_labels(camera)
    # PNG is lossless: the bytes in Kafka decode to exactly the camera's rendered frame.
    with Image.open(io.BytesIO(by_camera["cam-1"][4].value)) as image:
        assert image.size == SIZE
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), video.frame(4).pixels)


def test_cli_refuses_a_malformed_frame_size(kafka_settings: KafkaSettings,
                                            tmp_path: Path) -> None:
    env = {"FRAMECAST_KAFKA_BOOTSTRAP": str(kafka_settings.bootstrap_servers)}
    bad = run_cli("produce", "--source", "scenes", "--frame-size", "640by480", home=tmp_path,
                  env=env)
    assert bad.returncode == 2 and "--frame-size" in bad.stderr
