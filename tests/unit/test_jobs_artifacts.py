"""The artifact manifest: checksums written, verified, and a tampered artifact refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from serving.artifacts import (
    ArtifactError,
    ArtifactManifest,
    InputSpec,
    Training,
    load_artifact,
    write_manifest,
)


def _manifest() -> ArtifactManifest:
    now = datetime.now(UTC)
    return ArtifactManifest(
        name="test",
        version="1",
        model="optimized_cnn",
        classes=["a", "b"],
        input=InputSpec(shape=[-1, 28, 28, 1], dtype="int8", scale=1 / 255, zero_point=-128),
        training=Training(
            dataset="synthetic", epochs=1, workers=2, seed=0, started_at=now, finished_at=now
        ),
    )


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    directory = tmp_path / "artifact"
    (directory / "saved_model" / "variables").mkdir(parents=True)
    (directory / "model.tflite").write_bytes(b"\x00tflite-bytes" * 100)
    (directory / "saved_model" / "saved_model.pb").write_bytes(b"graph")
    (directory / "saved_model" / "variables" / "variables.index").write_bytes(b"index")
    (directory / "metrics.json").write_text("{}\n")
    write_manifest(directory, _manifest())
    return directory


def test_manifest_lists_every_file_with_sha256(artifact: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "model.tflite",
        "metrics.json",
        "saved_model/saved_model.pb",
        "saved_model/variables/variables.index",
    }
    assert manifest["files"]["model.tflite"]["bytes"] == 1300
    loaded = load_artifact(artifact)
    assert loaded.tflite_path == artifact.resolve() / "model.tflite"
    assert loaded.saved_model_path == artifact.resolve() / "saved_model"


def test_tampered_model_file_is_refused(artifact: Path) -> None:
    raw = bytearray((artifact / "model.tflite").read_bytes())
    raw[10] ^= 0xFF  # same size, one flipped byte
    (artifact / "model.tflite").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"model.tflite.*sha256"):
        load_artifact(artifact)


def test_missing_file_is_refused(artifact: Path) -> None:
    (artifact / "saved_model" / "saved_model.pb").unlink()
    with pytest.raises(ArtifactError, match=r"missing file 'saved_model/saved_model\.pb'"):
        load_artifact(artifact)


def test_unlisted_extra_file_is_refused(artifact: Path) -> None:
    (artifact / "evil.pkl").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match=r"unlisted file 'evil\.pkl'"):
        load_artifact(artifact)


def test_truncated_file_is_refused(artifact: Path) -> None:
    (artifact / "model.tflite").write_bytes(b"short")
    with pytest.raises(ArtifactError, match="5 bytes, manifest says 1300"):
        load_artifact(artifact)


def test_malformed_or_absent_manifest_is_refused(tmp_path: Path, artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        load_artifact(empty)
    (artifact / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(artifact)
    (artifact / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ArtifactError, match="invalid manifest"):
        load_artifact(artifact)


def test_input_shape_must_be_nhwc() -> None:
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        InputSpec(shape=[28, 28], dtype="float32")
