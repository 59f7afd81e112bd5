"""Model runtimes on the shipped artifact: LiteRT int8 and the SavedModel agree, GPU fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from serving.artifacts import load_artifact
from serving.config import ServeSettings
from serving.fashion_mnist import load_fashion_mnist
from serving.runtimes import LiteRTRuntime, SavedModelRuntime, select_runtime

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
    assert artifact.manifest.model == "stream_cnn"
    runtime = select_runtime(artifact, num_threads=1)
    assert (runtime.kind, runtime.precision) == ("litert", "int8")
    images, labels = load_fashion_mnist("test", limit=1000)
    probs = runtime.predict(images.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    assert accuracy >= 0.87, accuracy  # 90.06 % on all 10,000 (its README)


def test_stream_cnn_has_a_tenth_of_the_optimized_cnns_macs() -> None:
    from jobs.models import ModelSpec, build_model, count_macs

    stream = build_model(ModelSpec("stream_cnn"), (28, 28, 1), 10)
    optimized = build_model(ModelSpec("optimized_cnn"), (28, 28, 1), 10)
    assert stream.output_shape == (None, 10)
    assert count_macs(stream) * 9 < count_macs(optimized)
