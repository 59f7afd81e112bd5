"""Model runtimes on the shipped artifact: LiteRT int8 and the SavedModel agree, GPU fallback."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from serving.artifacts import ArtifactError, load_artifact
from serving.config import ServeSettings
from serving.fashion_mnist import load_fashion_mnist
from serving.runtimes import HealthSample, LiteRTRuntime, SavedModelRuntime, select_runtime

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "fashion_mnist_optimized"


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    images, _ = load_fashion_mnist("test", limit=64)
    return images.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0


def test_cpu_replica_runs_int8_litert_and_a_gpu_replica_the_savedmodel(batch: np.ndarray) -> None:
    artifact = load_artifact(SHIPPED)
    cpu = select_runtime(artifact, num_gpus=0, num_threads=1)
    assert isinstance(cpu, LiteRTRuntime)
    assert (cpu.kind, cpu.precision) == ("litert", "int8")
    # A replica given a GPU share serves the SavedModel; float16 is asked for by default,
    # and where TensorFlow sees no GPU (this machine) it runs float32 and says so.
    gpu = select_runtime(artifact, num_gpus=0.5)
    assert isinstance(gpu, SavedModelRuntime)
    assert gpu.kind == "savedmodel"
    assert (gpu.device, gpu.precision) == ("CPU", "float32")
    int8_probs = cpu.predict(batch)
    float_probs = gpu.predict(batch)
    assert int8_probs.shape == float_probs.shape == (64, 10)
    assert int8_probs.dtype == float_probs.dtype == np.float32
    np.testing.assert_allclose(float_probs.sum(axis=1), 1.0, atol=1e-4)
    agreement = np.mean(int8_probs.argmax(axis=1) == float_probs.argmax(axis=1))
    assert agreement >= 0.9, agreement


def test_unknown_gpu_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        SavedModelRuntime(SHIPPED / "saved_model", precision="bfloat8")
    with pytest.raises(ValidationError, match="gpu_precision"):
        ServeSettings(gpu_precision="int4")  # type: ignore[arg-type]


STREAM = SHIPPED.with_name("fashion_mnist_stream")


def test_the_shipped_stream_model_is_a_verified_int8_artifact_that_classifies() -> None:
    artifact = load_artifact(STREAM)  # verifies every checksum in its manifest
    assert artifact.manifest.model == "stream_fc"
    runtime = select_runtime(artifact, num_threads=1)
    assert (runtime.kind, runtime.precision) == ("litert", "int8")
    images, labels = load_fashion_mnist("test", limit=1000)
    probs = runtime.predict(images.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    assert accuracy >= 0.89, accuracy  # 92.35 % on all 10,000 (its README)


def test_stream_cnn_has_a_tenth_of_the_optimized_cnns_macs() -> None:
    from jobs.models import ModelSpec, build_model, count_macs

    stream = build_model(ModelSpec("stream_cnn"), (28, 28, 1), 10)
    optimized = build_model(ModelSpec("optimized_cnn"), (28, 28, 1), 10)
    assert stream.output_shape == (None, 10)
    assert count_macs(stream) * 9 < count_macs(optimized)


def _swap_in(target: Path, source: Path, name: str) -> None:
    """Replace target/name with source/name, as someone with write access to the directory."""
    (target / name).write_bytes((source / name).read_bytes())


def test_a_model_swapped_on_disk_after_hashing_is_not_the_one_loaded(
    tmp_path: Path, batch: np.ndarray
) -> None:
    # The check-then-reopen race, made deterministic: the file changes after load_artifact
    # hashed it and before the runtime is built. The runtime must run the hashed bytes.
    artifact_dir = tmp_path / "v1"
    shutil.copytree(SHIPPED, artifact_dir)
    artifact = load_artifact(artifact_dir)
    for name in (
        "model.tflite",
        "saved_model/saved_model.pb",
        "saved_model/variables/variables.index",
        "saved_model/variables/variables.data-00000-of-00001",
    ):
        _swap_in(artifact_dir, STREAM, name)

    original = LiteRTRuntime(SHIPPED / "model.tflite").predict(batch)
    swapped = LiteRTRuntime(STREAM / "model.tflite").predict(batch)
    assert not np.allclose(original, swapped, atol=1e-3)  # the swap would show
    served = select_runtime(artifact, num_threads=1).predict(batch)
    np.testing.assert_array_equal(served, original)

    # The SavedModel (GPU replicas) loads from a private copy of the hashed bytes.
    float_original = SavedModelRuntime(SHIPPED / "saved_model", precision="float32").predict(batch)
    float_served = select_runtime(artifact, num_gpus=0.5).predict(batch)
    np.testing.assert_allclose(float_served, float_original, atol=1e-6)
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        load_artifact(artifact_dir)  # a fresh load sees the swap and refuses it


def test_private_copy_is_private_and_holds_the_hashed_bytes(tmp_path: Path) -> None:
    artifact = load_artifact(SHIPPED)
    copy = artifact.private_copy("saved_model")
    try:
        assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
        for path in copy.rglob("*"):
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                name = path.relative_to(copy.parent).as_posix()
                assert path.read_bytes() == (SHIPPED / name).read_bytes()
    finally:
        shutil.rmtree(copy.parent)
    assert "contents" not in repr(artifact) and "contents" not in artifact.model_dump()


def test_health_sample_fails_once_the_model_answers_it_differently() -> None:
    shipped = select_runtime(load_artifact(SHIPPED), num_threads=1)
    sample = HealthSample(shipped, num_classes=10)
    assert len({arr.tobytes() for arr in sample.inputs}) == len(sample.inputs)  # not constant
    assert float(sample.inputs.std()) > 0.1
    sample.check(shipped)  # the same model answers as at load
    sample.check(select_runtime(load_artifact(SHIPPED), num_threads=2))  # so does a reload
    # A model that changed under the replica (here: other weights behind the same runtime
    # interface) no longer answers the recorded sample: the health check fails.
    other = select_runtime(load_artifact(STREAM), num_threads=1)
    with pytest.raises(RuntimeError, match="output changed since load"):
        sample.check(other)
