"""`framecast stream run --local-model`: the model in the classifier's own process, no Serve
and no Ray - labels, dead letters and commits as with Serve (real broker, real CLI process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from serving.runtimes import LiteRTRuntime
from streams.config import ClassifierConfig, KafkaSettings
from tests.streaming import (
    IMAGES,
    LABELS,
    committed_offsets,
    dead_letters,
    labels_of,
    producer,
    read_topic,
    send_arrow_frames,
    topics,
)

STREAM_MODEL = Path(__file__).resolve().parents[2] / "models" / "fashion_mnist_stream"


def run_local(
    kafka_settings: KafkaSettings, config: ClassifierConfig, home: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`framecast stream run --local-model` with no Ray address anywhere in its environment."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FRAMECAST_", "RAY_"))}
    argv = [
        str(Path(sys.executable).parent / "framecast"), "--home", str(home),
        "--bootstrap-servers", str(kafka_settings.bootstrap_servers),
        "stream", "run", "--frames", config.frames_topic, "--labels", config.labels_topic,
        "--latency", config.latency_topic, "--dlq", config.dlq_topic, "--group", config.group,
        "--local-model", str(STREAM_MODEL), "--idle-exit-s", "4", *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def test_local_model_labels_every_frame_as_litert_does_and_dead_letters_bad_ones(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config = topics(kafka_settings)
    sent = send_arrow_frames(kafka_settings, config.frames_topic, streams=3, per_stream=30)
    p = producer(kafka_settings)
    headers = [("content-type", b"image/jpeg"), ("stream_id", b"cam-bad"),
               ("frame_index", b"0"), ("captured_at_ns", b"1")]
    p.send(config.frames_topic, key=b"cam-bad", value=os.urandom(400), headers=headers)
    p.flush(timeout=60)
    p.close()

    result = run_local(kafka_settings, config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model in process" in result.stderr
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 90))
    assert len(labels) == 90
    direct = (
        LiteRTRuntime(STREAM_MODEL / "model.tflite")
        .predict(IMAGES[:, :, :, None] / np.float32(255))
        .argmax(axis=1)
    )
    rows = {(s, i): row for s, i, row in sent}
    manifest = (STREAM_MODEL / "manifest.json").read_text()
    for label in labels:
        row = rows[(label.stream_id, label.frame_index)]
        assert label.class_id == int(direct[row])
        assert label.ground_truth == int(LABELS[row])
        assert label.status == "ok"
        assert label.model["sha256"] and label.model["sha256"] in manifest
        assert label.timings_ms["end_to_end"] >= label.timings_ms["inference"] > 0
    letters = dead_letters(kafka_settings, config.dlq_topic, 1)
    assert [letter.reason for letter in letters] == ["undecodable"]
    assert committed_offsets(kafka_settings, config.group) == 91  # every message, bad included


def test_local_model_exactly_once_gives_one_committed_label_per_frame(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config = topics(kafka_settings, partitions=2)
    send_arrow_frames(kafka_settings, config.frames_topic, streams=2, per_stream=25)
    result = run_local(kafka_settings, config, tmp_path, "--guarantee", "exactly-once")
    assert result.returncode == 0, result.stderr[-3000:]
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 50, committed_only=True))
    assert sorted((lab.stream_id, lab.frame_index) for lab in labels) == sorted(
        (f"cam-{s}", i) for s in range(2) for i in range(25)
    )


def test_local_model_refuses_a_missing_artifact_naming_it(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config = topics(kafka_settings, partitions=1)
    missing = tmp_path / "no-such-model"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAMECAST_", "RAY_"))}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "framecast"), "--home", str(tmp_path),
         "--bootstrap-servers", str(kafka_settings.bootstrap_servers), "stream", "run",
         "--frames", config.frames_topic, "--local-model", str(missing), "--idle-exit-s", "2"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert result.returncode != 0
    assert str(missing) in result.stderr
