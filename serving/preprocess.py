"""Frame decoding and preprocessing in the replicas: bytes -> normalized model input.

Limits are checked before any pixel is decoded: the size of the encoded frame, the pixel
count read from the image header (so a decompression bomb is refused without inflating it),
and the formats (JPEG and PNG only, so no surprise decoder runs on untrusted bytes).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.exceptions import FrameDecodeError as FrameDecodeError  # re-exported
from serving.frames import FrameRecord

_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
CONTENT_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}


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
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked from the header below, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[pil_format])
            limits.check_dimensions(image.width, image.height)
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
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


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
    return image.astype(np.float32) / 255.0
