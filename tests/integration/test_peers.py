"""The peer pipelines of `framecast bench peers` (peers/), run as their programs, against the
real broker and the real Serve app: every frame labelled, with framecast's answer."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from cluster.bench.camera import camera_clip
from cluster.kafka_broker import EmbeddedKafka
from cluster.processes import free_port
from cluster.ray_head import RayHeadInfo
from serving.frames import ARROW_CONTENT_TYPE, FrameRecord, decode_frames
from serving.preprocess import DecodeLimits, batch_input, frame_pixels
from serving.runtimes import LiteRTRuntime
from streams.client import admin_client
from streams.config import KafkaSettings
from streams.labels import LabelRecord
from streams.producers import encode_pixels, produce_frames
from streams.topics import TopicSpec, ensure_topics
from streams.video import SyntheticSource
from tests.conftest import REPO, SHIPPED_MODEL, run_cli
from tests.streaming import committed_offsets, read_topic

PEERS = REPO / "peers"
MODEL = SHIPPED_MODEL / "model.tflite"
FRAMES = 200
KAFKA_PEERS = {
    "floor": Path(sys.executable),  # framecast's own .venv
    "quix_app": REPO / ".venv-peers" / "quix" / "bin" / "python",
    "bytewax_app": REPO / ".venv-peers" / "bytewax" / "bin" / "python",
}
FrameKey = tuple[str, int]


def _expected(frames: list[FrameRecord]) -> dict[FrameKey, int]:
    """The class serving's LiteRT runtime gives each frame, decoded as a replica does."""
    runtime = LiteRTRuntime(MODEL)
    inputs = batch_input([frame_pixels(f, DecodeLimits(), runtime.input_hwc) for f in frames])
    ids = runtime.predict(inputs).argmax(axis=1)
    return {(f.stream_id, f.frame_index): int(c) for f, c in zip(frames, ids, strict=True)}


def _frames_of(kafka_settings: KafkaSettings, topic: str, count: int) -> list[FrameRecord]:
    """Every frame on the frames topic, read back from the broker."""
    frames: list[FrameRecord] = []
    for record in read_topic(kafka_settings, topic, count, settle_s=1.0):
        headers = {k: v for k, v in record.headers}
        kind = headers["content-type"].decode()
        if kind == ARROW_CONTENT_TYPE:
            frames += decode_frames(record.value)
        else:
            frames.append(FrameRecord(
                headers["stream_id"].decode(), int(headers["frame_index"]),
                int(headers["captured_at_ns"]), kind.split("/")[1], 0, 0, 0, record.value,
                int(headers["label"]) if "label" in headers else None))
    return frames


@pytest.fixture(scope="module")
def frames_topic(kafka_settings: KafkaSettings) -> tuple[str, dict[FrameKey, int], int]:
    """200 frames in both encodings of the contract, sent by framecast's own producer: Arrow
    raw frames 4 to a message, Arrow PNG, bare JPEG and bare PNG (50 each, synthetic 32x32
    video, so every frame is resized to the model's 28x28). Returns the topic, the expected
    class of each frame and the number of messages."""
    topic = f"peer-frames-{uuid.uuid4().hex[:8]}"
    with admin_client(kafka_settings) as admin:
        ensure_topics(admin, [TopicSpec(name=topic, partitions=3, replication_factor=1)])
    messages = 0
    for prefix, encoding, fmt, batch in (("raw", "raw", "arrow", 4), ("png", "png", "arrow", 1),
                                         ("bj", "jpeg", "bare", 1), ("bp", "png", "bare", 1)):
        summary = produce_frames(kafka_settings, None, "synthetic", topic, fps=0, streams=2,
                                 count=25, encoding=encoding, message_format=fmt, batch=batch,
                                 stream_prefix=prefix, create_topic=False)
        messages += summary["messages"]
    frames = _frames_of(kafka_settings, topic, messages)
    assert len(frames) == FRAMES
    return topic, _expected(frames), messages


def _labels_topic(kafka_settings: KafkaSettings) -> str:
    topic = f"peer-labels-{uuid.uuid4().hex[:8]}"
    with admin_client(kafka_settings) as admin:
        ensure_topics(admin, [TopicSpec(name=topic, partitions=3, replication_factor=1)])
    return topic


def _run(argv: list[str], timeout: float = 300) -> tuple[dict[str, Any], str]:
    """Run a peer to its end: (its final JSON line, its stderr)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout[-2000:]
    return json.loads(lines[0]), done.stderr


def _model_sha256() -> str:
    manifest = json.loads((SHIPPED_MODEL / "manifest.json").read_text())
    return str(manifest["files"]["model.tflite"]["sha256"])


def _check_labels(labels: list[LabelRecord], expected: dict[FrameKey, int]) -> None:
    by_frame: dict[FrameKey, LabelRecord] = {}
    for label in labels:  # at-least-once: duplicates are allowed and must agree
        key = (label.stream_id, label.frame_index)
        assert by_frame.setdefault(key, label).class_id == label.class_id
    assert set(by_frame) == set(expected)
    sha256 = _model_sha256()
    for key, label in by_frame.items():
        assert label.status == "ok"
        assert label.class_id == expected[key], key
        assert label.model is not None and label.model["sha256"] == sha256
        assert label.timings_ms["end_to_end"] >= label.timings_ms["inference"] >= 0
        assert label.labeled_at_ns >= label.captured_at_ns


@pytest.mark.parametrize("peer", list(KAFKA_PEERS))
def test_kafka_peer_labels_every_frame_as_framecast_does_and_commits(
    peer: str, kafka_settings: KafkaSettings,
    frames_topic: tuple[str, dict[FrameKey, int], int],
) -> None:
    python = KAFKA_PEERS[peer]
    if not python.exists():
        pytest.skip(f"{python.parent.parent} is missing: run `make peers`")
    topic, expected, messages = frames_topic
    labels_topic = _labels_topic(kafka_settings)
    group = f"peer-{peer}-{uuid.uuid4().hex[:8]}"
    final, stderr = _run([
        str(python), str(PEERS / f"{peer}.py"),
        "--bootstrap", kafka_settings.bootstrap_servers, "--frames", topic,
        "--labels", labels_topic, "--group", group, "--model", str(MODEL),
        "--max-frames", str(FRAMES), "--batch", "16",
    ])
    assert "READY" in stderr.splitlines()
    assert final["labelled"] >= FRAMES
    assert final["cpu_s"] > 0
    records = read_topic(kafka_settings, labels_topic, FRAMES, settle_s=1.0)
    assert all(r.key.decode() == json.loads(r.value)["stream_id"] for r in records)
    _check_labels([LabelRecord.model_validate_json(r.value) for r in records], expected)
    # At-least-once: the offsets committed are those of every frame labelled, no further.
    assert committed_offsets(kafka_settings, group) == messages


def test_floor_resumes_from_its_committed_offsets(
    kafka_settings: KafkaSettings, frames_topic: tuple[str, dict[FrameKey, int], int],
) -> None:
    """Two runs of one group: the second labels the frames the first did not commit."""
    topic, expected, messages = frames_topic
    labels_topic = _labels_topic(kafka_settings)
    group = f"peer-floor-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, str(PEERS / "floor.py"), "--bootstrap",
            kafka_settings.bootstrap_servers, "--frames", topic, "--labels", labels_topic,
            "--group", group, "--model", str(MODEL), "--batch", "8"]
    first, _ = _run([*argv, "--max-frames", "60"])
    assert FRAMES > first["labelled"] >= 60
    second, _ = _run([*argv, "--max-frames", str(FRAMES - first["labelled"])])
    assert first["labelled"] + second["labelled"] == FRAMES  # nothing read twice
    records = read_topic(kafka_settings, labels_topic, FRAMES, settle_s=1.0)
    _check_labels([LabelRecord.model_validate_json(r.value) for r in records], expected)
    assert committed_offsets(kafka_settings, group) == messages


def _http_cameras(kafka_settings: KafkaSettings, stream_app: str, serve_port: int,
                  cameras: int, per_camera: int, *extra: str) -> list[LabelRecord]:
    """Run peers/http_cameras.py flat out against the session's Serve app; the labels it
    wrote, one per frame (its final JSON line checked: all labelled, no error)."""
    labels_topic = _labels_topic(kafka_settings)
    final, stderr = _run([
        sys.executable, str(PEERS / "http_cameras.py"),
        "--url", f"http://127.0.0.1:{serve_port}/{stream_app}/classify",
        "--bootstrap", kafka_settings.bootstrap_servers, "--labels", labels_topic,
        "--cameras", str(cameras), "--fps", "0", "--per-camera", str(per_camera), *extra,
    ])
    assert (final["labelled"], final["errors"]) == (cameras * per_camera, 0), stderr[-2000:]
    records = read_topic(kafka_settings, labels_topic, cameras * per_camera, settle_s=1.0)
    labels = [LabelRecord.model_validate_json(r.value) for r in records]
    assert len(labels) == cameras * per_camera
    return labels


def test_http_cameras_label_what_serve_answers(
    kafka_settings: KafkaSettings, stream_app: str, serve_port: int,
) -> None:
    cameras, per_camera = 2, 20
    labels = _http_cameras(kafka_settings, stream_app, serve_port, cameras, per_camera)
    # The same frames the cameras sent (the synthetic video is deterministic), as PNG.
    source = SyntheticSource()
    frames = []
    for k in range(cameras):
        shots = source.stream(k)
        for index in range(per_camera):
            frames.append(FrameRecord(f"cam-{k}", index, 0, "png", 0, 0, 0,
                                      encode_pixels(next(shots).pixels, "png"), None))
    _check_labels(labels, _expected(frames))


def test_http_cameras_post_the_camera_regimes_jpeg_clip(
    kafka_settings: KafkaSettings, stream_app: str, serve_port: int,
) -> None:
    """--frame-size: the cameras POST the pre-encoded RGB JPEG clip (camera k starts k frames
    into it), ground truth in every label; Serve's answers are the runtime's on those JPEGs."""
    cameras, per_camera = 2, 6
    labels = _http_cameras(kafka_settings, stream_app, serve_port, cameras, per_camera,
                           "--frame-size", "320x240")
    clip, _ = camera_clip(320, 240)
    frames = [FrameRecord(f"cam-{k}", i, 0, "jpeg", 240, 320, 3, *clip[(i + k) % len(clip)])
              for k in range(cameras) for i in range(per_camera)]
    _check_labels(labels, _expected(frames))
    truth = {(f.stream_id, f.frame_index): f.label for f in frames}
    assert None not in truth.values()
    assert all(x.ground_truth == truth[(x.stream_id, x.frame_index)] for x in labels)


@pytest.mark.slow
def test_bench_peers_camera_regime_labels_jpeg_frames_with_ground_truth(
    kafka_broker: EmbeddedKafka, ray_head: RayHeadInfo, serve_port: int, tmp_path: Path,
) -> None:
    """`framecast bench peers --quick --frame-size 320x240 --pipelines framecast` (Serve +
    models/scenes) on the session's broker and Ray cluster (external to the bench: it starts
    and stops neither) under a Serve app of its own. One pipeline: the camera regime's own
    code (the clip cameras, the options, the artifact, the report) is the same for all of them,
    the peers' decoding at 224x224x3 is test_peer_common's and the http cameras' JPEGs are
    tested above. Its figures are not checked (the machine is shared); that the camera regime
    ran and labelled frames with their ground truth, is."""
    out = tmp_path / "out"
    env = {
        "FRAMECAST_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "FRAMECAST_RAY_ADDRESS": ray_head.address,
        "FRAMECAST_SERVE_HTTP_PORT": str(serve_port),
        "FRAMECAST_SERVE_APP_NAME": "peers-camera",
        "FRAMECAST_SERVE_ROUTE_PREFIX": "/peers-camera",
        "FRAMECAST_DASHBOARD_PORT": str(free_port()),
    }
    done = run_cli("bench", "peers", "--quick", "--frame-size", "320x240", "--pipelines",
                   "framecast", "--out", str(out), home=tmp_path / "home", env=env,
                   timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "bench-peers.json").read_text())
    assert report["frame_size"] == "320x240"
    assert report["artifact"].endswith("models/scenes")
    assert report["cameras"]["frame_size"] == "320x240" and report["cameras"]["ground_truth"]
    assert report["options"]["fps_per_camera"] == 15.0
    (row,) = report["pipelines"]
    assert row["name"] == "framecast" and "error" not in row, row
    assert row["labelled"] == row["frames"] > 0  # the flat-out run, every frame
    assert row["ground_truth_labels"] == row["labelled"]
    assert row["flat_out_accuracy"] is not None and row["frames_per_s"] > 0
    assert {"capacity_fps_p99_15ms", "capacity_fps_p99_50ms", "frames_per_s_per_core",
            "loads", "steps"} <= set(row)
    assert row["steps"] and all(
        s["cameras"] * s["fps_per_camera"] == pytest.approx(s["offered_fps"], abs=1)
        and s["fps_per_camera"] <= 15.0 for s in row["steps"])
    text = (out / "bench-peers.md").read_text()
    assert text.startswith("# framecast bench peers: 320x240 camera JPEG frames\n")
    assert "| framecast |" in text
    assert (out / "bench-peers.png").read_bytes()[:4] == b"\x89PNG"


def test_the_peers_share_no_framecast_code() -> None:
    """The Kafka peers run in venvs without framecast: they import only common.py of it."""
    for peer in (*KAFKA_PEERS, "common"):
        source = (PEERS / f"{peer}.py").read_text()
        for package in ("streams", "serving", "cluster", "jobs"):
            assert f"from {package}" not in source and f"import {package}" not in source, peer
