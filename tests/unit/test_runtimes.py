"""Model runtimes on the shipped artifact: LiteRT int8 and the SavedModel agree, GPU fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from serving.artifacts import load_artifact
from serving.config import ServeSettings
from serving.idx import load_fashion_mnist
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
