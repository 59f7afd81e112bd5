"""Frame decoding and preprocessing in the replicas: bytes -> normalized model input.

Limits are checked before any pixel is decoded: the size of the encoded frame, the pixel
count read from the image header (so a decompression bomb is refused without inflating it),
and the formats (JPEG and PNG only, so no surprise decoder runs on untrusted bytes).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.exceptions import FrameDecodeError as FrameDecodeError  # re-exported
from serving.frames import FrameRecord

_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
CONTENT_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
# How small a side of a DCT-scaled JPEG may be against the model's input side (it is then
# resized up): 0.8 lets a 1280x720 frame decode at 1/4 (320x180) for a 224x224 model. Its
# rows are then upsampled 1.24x, and they are still finer than its columns (1280 -> 224 is
# the coarser axis); the decode costs about half as much as at 1/2 (docs/BENCHMARKS.md).
DRAFT_COVER = 0.8


@dataclass(frozen=True)
class DecodeLimits:
    """What a replica accepts before it decodes anything."""

    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 3840 * 2160
    max_side: int = 8192

    def check_bytes(self, size: int) -> None:
        """Refuse an encoded frame larger than max_bytes."""
        if size == 0:
            raise FrameDecodeError("empty", "the frame has no bytes")
        if size > self.max_bytes:
            raise FrameDecodeError("too_large", f"{size} bytes > limit {self.max_bytes}")

    def check_dimensions(self, width: int, height: int, channels: int = 1) -> None:
        """Refuse dimensions that are non-positive or exceed the pixel limits."""
        if width <= 0 or height <= 0 or channels not in (1, 3, 4):
            raise FrameDecodeError(
                "bad_dimensions", f"{width}x{height}x{channels} is not a valid image shape"
            )
        if width > self.max_side or height > self.max_side or width * height > self.max_pixels:
            raise FrameDecodeError(
                "too_many_pixels",
                f"{width}x{height} exceeds the limit of {self.max_pixels} pixels "
                f"({self.max_side} per side)",
            )


def decode_image(
    data: bytes,
    encoding: str,
    limits: DecodeLimits,
    *,
    height: int = 0,
    width: int = 0,
    channels: int = 0,
) -> np.ndarray:
    """Decode one frame to uint8 [H, W, C]; raise FrameDecodeError with a reason code."""
    limits.check_bytes(len(data))
    if encoding == "raw":
        limits.check_dimensions(width, height, channels)
        expected = height * width * channels
        if len(data) != expected:
            raise FrameDecodeError(
                "bad_dimensions",
                f"raw frame has {len(data)} bytes, {height}x{width}x{channels} needs {expected}",
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    pil_format = _PIL_FORMATS.get(encoding)
    if pil_format is None:
        raise FrameDecodeError(
            "unsupported_format", f"encoding {encoding!r} is not one of jpeg, png, raw"
        )
    image, _ = _open_image(data, encoding, pil_format, limits)
    return _array(image)


def _array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


Box = tuple[float, float, float, float]


def _open_image(
    data: bytes,
    encoding: str,
    pil_format: str,
    limits: DecodeLimits,
    draft: tuple[str, tuple[int, int]] | None = None,
) -> tuple[Image.Image, Box | None]:
    """Decode a JPEG/PNG (mode L or RGB); FrameDecodeError with a reason code.

    ``draft`` (mode, (width, height)), JPEG only: libjpeg decodes at the smallest of its DCT
    scales 1/8, 1/4, 1/2 that is still at least (width, height) - most of the IDCT, the
    upsampling and the colour conversion are skipped - and in mode L straight from the luma.
    The box is the whole frame in the scaled image's coordinates (for resize), or None."""
    box: Box | None = None
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked from the header below, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[pil_format])
            limits.check_dimensions(image.width, image.height)
            if draft is not None:
                drafted = image.draft(*draft)
                if drafted is not None:
                    box = drafted[1]
            image.load()
    except FrameDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise FrameDecodeError("too_many_pixels", str(error)) from None
    except Image.UnidentifiedImageError:
        raise FrameDecodeError("undecodable", f"not a valid {encoding.upper()} image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise FrameDecodeError(
            "undecodable", f"not a valid {encoding.upper()} image ({error})"
        ) from None
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image, box


def decode_frame(frame: FrameRecord, limits: DecodeLimits) -> np.ndarray:
    """Decode a frame record (any encoding) to uint8 [H, W, C]."""
    return decode_image(
        frame.data,
        frame.encoding,
        limits,
        height=frame.height,
        width=frame.width,
        channels=frame.channels,
    )


def to_model_input(image: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """Resize and convert channels to the model's input, scaled to [0, 1] float32."""
    return to_model_pixels(image, height, width, channels).astype(np.float32) / 255.0


def to_model_pixels(image: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """uint8 [height, width, channels]: the channels converted (luma weights for gray), then
    resized (bilinear)."""
    if image.shape[2] != channels:
        if channels == 1:
            image = (
                (
                    image[:, :, :3].astype(np.float32)
                    @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
                )[:, :, None]
                .round()
                .astype(np.uint8)
            )
        else:
            image = np.repeat(image[:, :, :1], channels, axis=2)
    if image.shape[0] != height or image.shape[1] != width:
        mode = "L" if channels == 1 else "RGB"
        pil = Image.fromarray(image[:, :, 0] if channels == 1 else image, mode=mode)
        resized = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
        image = resized[:, :, None] if resized.ndim == 2 else resized
    return image


def image_pixels(
    data: bytes,
    encoding: str,
    limits: DecodeLimits,
    hwc: tuple[int, int, int],
    *,
    height: int = 0,
    width: int = 0,
    channels: int = 0,
) -> np.ndarray:
    """One encoded frame straight to the model's uint8 [H, W, C] (``hwc``).

    JPEG is decoded at the DCT scale the model needs (see :func:`_open_image`; a side may
    come out down to ``DRAFT_COVER`` of the model's), then resized
    to the model input: the same pixels as :func:`decode_image` + :func:`to_model_pixels`
    within a small tolerance (tests/unit/test_fast_decode.py), in a third to a half of the
    time at camera sizes (docs/BENCHMARKS.md). PNG and raw frames take the full path.
    Errors are those of :func:`decode_image`.
    """
    out_h, out_w, out_c = hwc
    if encoding != "jpeg" or out_c not in (1, 3):
        image = decode_image(data, encoding, limits, height=height, width=width, channels=channels)
        return to_model_pixels(image, out_h, out_w, out_c)
    limits.check_bytes(len(data))
    mode = "L" if out_c == 1 else "RGB"
    wanted = (math.ceil(out_w * DRAFT_COVER), math.ceil(out_h * DRAFT_COVER))
    pil, box = _open_image(data, encoding, "JPEG", limits, draft=(mode, wanted))
    if pil.mode != mode and out_c == 1:  # a CMYK JPEG, converted to RGB: luma as above
        return to_model_pixels(_array(pil), out_h, out_w, out_c)
    if pil.size != (out_w, out_h) or (box is not None and box != (0, 0, out_w, out_h)):
        pil = pil.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    pixels = _array(pil)
    if pixels.shape[2] != out_c:  # a grayscale JPEG for an RGB model
        pixels = np.repeat(pixels, out_c, axis=2)
    return pixels


def frame_pixels(frame: FrameRecord, limits: DecodeLimits, hwc: tuple[int, int, int]) -> np.ndarray:
    """A frame record (any encoding) as the model's uint8 pixels (:func:`image_pixels`)."""
    return image_pixels(
        frame.data,
        frame.encoding,
        limits,
        hwc,
        height=frame.height,
        width=frame.width,
        channels=frame.channels,
    )


def batch_input(pixels: Sequence[np.ndarray]) -> np.ndarray:
    """Same-shaped uint8 frames as one float32 batch scaled to [0, 1]: one copy into the
    batch and one vectorized conversion (the same values as :func:`to_model_input` each)."""
    batch: np.ndarray = np.divide(np.stack(pixels), np.float32(255.0), dtype=np.float32)
    return batch


class PixelConverter:
    """uint8 pixels straight to a model's input dtype: the values :func:`batch_input` and the
    runtime's own quantization of its floats give, with no float32 batch in between.

    ``quantize`` maps a float32 batch in [0, 1] to the model's input (a LiteRT runtime's
    ``round(x / scale + zero_point)``, clipped; None for a float32 input). It is applied once,
    to the 256 pixel values, at construction: a frame is then converted in one vectorized pass
    into its row of a preallocated batch - an XOR (``p - 128`` as int8, the usual scale 1/255
    and zero point -128), a copy (uint8, zero point 0), a table lookup (any other
    quantization) or one division (float32). Per 224x224x3 frame that is ~0.03 ms instead of
    ~0.5 ms for the float32 batch, the division, the rounding and the clip
    (docs/BENCHMARKS.md, "Camera resolution").
    """

    def __init__(
        self, dtype: np.dtype, quantize: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        self.dtype = np.dtype(dtype)
        values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1, 1)
        if quantize is None:
            table = batch_input([values[0]]).ravel().astype(self.dtype)
        else:
            table = np.asarray(quantize(batch_input([values[0]]))).ravel()
        if table.dtype != self.dtype:
            raise ValueError(f"quantize gave {table.dtype}, expected {self.dtype}")
        self.table = table
        self.pad = table[0]  # a padding row: what a black frame converts to
        shifted = (np.arange(256, dtype=np.uint8) ^ np.uint8(0x80)).view(np.int8)
        if quantize is None and self.dtype == np.float32:
            self.kind = "divide"
        elif self.dtype == np.int8 and np.array_equal(table, shifted):
            self.kind = "xor"
        elif self.dtype == np.uint8 and np.array_equal(table, np.arange(256, dtype=np.uint8)):
            self.kind = "copy"
        else:
            self.kind = "table"

    def into(self, pixels: np.ndarray, out: np.ndarray) -> None:
        """Convert uint8 ``pixels`` into ``out`` (same shape, this converter's dtype)."""
        if self.kind == "xor":
            np.bitwise_xor(pixels, np.uint8(0x80), out=out.view(np.uint8))
        elif self.kind == "copy":
            np.copyto(out, pixels)
        elif self.kind == "divide":
            np.divide(pixels, np.float32(255.0), out=out, dtype=np.float32)
        else:
            np.take(self.table, pixels, out=out)

    def batch(self, pixels: Sequence[np.ndarray], rows: int | None = None) -> np.ndarray:
        """Same-shaped uint8 frames as one preallocated batch of ``rows`` (default: as many
        as frames; rows past the frames are padding)."""
        if not len(pixels):
            raise ValueError("no frames to batch")
        rows = len(pixels) if rows is None else rows
        if rows < len(pixels):
            raise ValueError(f"{len(pixels)} frames do not fit in {rows} rows")
        out = np.empty((rows, *pixels[0].shape), self.dtype)
        for row, frame in enumerate(pixels):
            self.into(frame, out[row])
        out[len(pixels):] = self.pad
        return out
