"""The DCT-scaled JPEG path in a real replica (issue 16 item 5): camera-size JPEG frames get
the classes the model gives the fully decoded frames, each answer carries its decode time,
and a corrupt JPEG among them is answered with its own error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from ray import serve

from serving.fashion_mnist import load_fashion_mnist
from serving.frames import FrameRecord
from serving.preprocess import DecodeLimits, decode_image, to_model_input
from serving.results import ClassifyResult, FrameError
from serving.runtimes import LiteRTRuntime


def camera_frame(garment: np.ndarray, size: tuple[int, int]) -> bytes:
    """A Fashion-MNIST garment blown up to a 640x480 RGB camera frame (JPEG quality 85)."""
    image = Image.fromarray(garment).resize(size, Image.Resampling.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def test_camera_jpeg_frames_in_a_replica_match_the_full_decode_and_carry_decode_ms(
    stream_app: str, served_artifact: Path
) -> None:
    x, _ = load_fashion_mnist("test", limit=32)
    jpegs = [camera_frame(img, (640, 480)) for img in x]
    frames = [
        FrameRecord("cam", i, 0, "jpeg", 480, 640, 3, data) for i, data in enumerate(jpegs)
    ]
    frames.insert(5, FrameRecord("cam", 99, 0, "jpeg", 480, 640, 3, jpegs[5][:2000]))

    runtime = LiteRTRuntime(served_artifact / "model.tflite")
    full = np.stack(
        [to_model_input(decode_image(j, "jpeg", DecodeLimits()), *runtime.input_hwc) for j in jpegs]
    )
    expected = runtime.predict(full).argmax(axis=1).tolist()

    answers = serve.get_app_handle(stream_app).classify_frames.remote(frames).result(timeout_s=120)
    bad = answers.pop(5)
    assert isinstance(bad, FrameError) and bad.reason == "undecodable", bad
    assert all(isinstance(a, ClassifyResult) for a in answers), answers
    results = [a for a in answers if isinstance(a, ClassifyResult)]
    agree = sum(r.class_id == e for r, e in zip(results, expected, strict=True))
    assert agree >= len(expected) - 1, (agree, [r.class_id for r in results], expected)
    assert all(r.decode_ms > 0 for r in results), [r.decode_ms for r in results]
