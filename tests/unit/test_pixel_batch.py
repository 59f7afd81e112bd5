"""Batch preprocessing in the replica (issue 16 item 5): uint8 frames go straight into the
model's input dtype, with exactly the values the float32 path (batch_input, then the runtime's
quantization) gives, for every pixel value and every kind of input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.preprocess import PixelConverter, batch_input
from serving.runtimes import LiteRTRuntime

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "fashion_mnist_stream"
ALL_VALUES = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)


def quantizer(scale: float, zero_point: int, dtype: type) -> object:
    """A LiteRT runtime's input quantization (LiteRTRuntime._quantize) for these parameters."""
    info = np.iinfo(dtype)

    def quantize(batch: np.ndarray) -> np.ndarray:
        return np.clip(np.round(batch / scale + zero_point), info.min, info.max).astype(dtype)

    return quantize


@pytest.mark.parametrize(
    ("dtype", "scale", "zero_point", "kind"),
    [
        (np.int8, 1 / 255, -128, "xor"),  # what full-integer int8 models take
        (np.uint8, 1 / 255, 0, "copy"),
        (np.int8, 0.0045, -100, "table"),  # calibrated on darker images
        (np.float32, None, None, "divide"),  # a float LiteRT model
    ],
)
def test_converted_batch_equals_the_float_path(
    dtype: type, scale: float | None, zero_point: int | None, kind: str
) -> None:
    quantize = None if scale is None else quantizer(scale, zero_point or 0, dtype)
    converter = PixelConverter(np.dtype(dtype), quantize)  # type: ignore[arg-type]
    assert converter.kind == kind
    frames = [ALL_VALUES, ALL_VALUES[::-1].copy(), np.zeros_like(ALL_VALUES)]
    floats = batch_input(frames)
    expected = floats if quantize is None else quantize(floats)  # type: ignore[operator]
    batch = converter.batch(frames, rows=4)
    assert batch.dtype == np.dtype(dtype) and batch.shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(batch[:3], expected)
    np.testing.assert_array_equal(batch[3], np.full((16, 16, 1), converter.pad))


def test_litert_predict_pixels_equals_predict_on_floats() -> None:
    runtime = LiteRTRuntime(SHIPPED / "model.tflite")
    frames = [
        np.random.default_rng(seed).integers(0, 256, runtime.input_hwc, dtype=np.uint8)
        for seed in range(5)
    ]
    assert runtime.converter.kind == "xor"
    np.testing.assert_array_equal(
        runtime.predict_pixels(frames), runtime.predict(batch_input(frames))
    )


def test_a_batch_needs_frames_and_room_for_them() -> None:
    converter = PixelConverter(np.dtype(np.float32))
    with pytest.raises(ValueError, match="no frames"):
        converter.batch([])
    with pytest.raises(ValueError, match="do not fit"):
        converter.batch([ALL_VALUES, ALL_VALUES], rows=1)
