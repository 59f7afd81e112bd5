"""Frame decoding limits and preprocessing, before any model is involved."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.preprocess import DecodeLimits, FrameDecodeError, decode_image, to_model_input

LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=1000 * 1000, max_side=2000)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(28, 28), dtype=np.uint8)


def test_png_decodes_losslessly(image: np.ndarray) -> None:
    np.testing.assert_array_equal(decode_image(encode(image, "PNG"), "png", LIMITS)[:, :, 0], image)


def test_raw_frame_needs_matching_dimensions(image: np.ndarray) -> None:
    out = decode_image(image.tobytes(), "raw", LIMITS, height=28, width=28, channels=1)
    np.testing.assert_array_equal(out[:, :, 0], image)
    with pytest.raises(FrameDecodeError, match="784 bytes, 28x27x1 needs 756") as excinfo:
        decode_image(image.tobytes(), "raw", LIMITS, height=28, width=27, channels=1)
    assert excinfo.value.reason == "bad_dimensions"


@pytest.mark.parametrize(
    ("payload", "encoding", "reason"),
    [
        (b"", "png", "empty"),
        (b"\x89PNG garbage" * 5, "png", "undecodable"),
        (b"x" * ((1 << 20) + 1), "jpeg", "too_large"),
        (b"GIF89a....", "gif", "unsupported_format"),
    ],
)
def test_bad_bytes_get_a_reason(payload: bytes, encoding: str, reason: str) -> None:
    with pytest.raises(FrameDecodeError) as excinfo:
        decode_image(payload, encoding, LIMITS)
    assert excinfo.value.reason == reason


def test_truncated_jpeg_is_refused(image: np.ndarray) -> None:
    data = encode(np.stack([image] * 3, axis=2), "JPEG")
    with pytest.raises(FrameDecodeError) as excinfo:
        decode_image(data[: len(data) // 2], "jpeg", LIMITS)
    assert excinfo.value.reason == "undecodable"


def test_png_claiming_a_jpeg_is_refused(image: np.ndarray) -> None:
    with pytest.raises(FrameDecodeError, match="not a valid JPEG"):
        decode_image(encode(image, "PNG"), "jpeg", LIMITS)


def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = encode(np.zeros((3000, 3000), dtype=np.uint8), "PNG")  # ~9 Mpx of zeros, few KB
    assert len(bomb) < 64 * 1024
    with pytest.raises(FrameDecodeError, match="3000x3000 exceeds") as excinfo:
        decode_image(bomb, "png", LIMITS)
    assert excinfo.value.reason == "too_many_pixels"


def test_model_input_is_resized_converted_and_scaled(image: np.ndarray) -> None:
    rgb = np.stack([image] * 3, axis=2)
    gray = to_model_input(rgb, 28, 28, 1)
    assert gray.shape == (28, 28, 1)
    assert gray.dtype == np.float32
    np.testing.assert_allclose(gray[:, :, 0], image / 255.0, atol=1 / 255)
    big = to_model_input(image[:, :, None], 32, 32, 3)
    assert big.shape == (32, 32, 3)
    assert 0.0 <= big.min() <= big.max() <= 1.0
