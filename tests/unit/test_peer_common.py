"""peers/common.py decodes, scales and classifies exactly as framecast's replicas do."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from serving.frames import ARROW_CONTENT_TYPE, FrameRecord, encode_frames
from serving.preprocess import DecodeLimits, batch_input, frame_pixels
from serving.runtimes import LiteRTRuntime
from streams.producers import bare_headers, encode_pixels
from tests.conftest import REPO, SHIPPED_MODEL

MODEL = SHIPPED_MODEL / "model.tflite"
RGB_MODEL = REPO / "models" / "scenes" / "model.tflite"  # camera_cnn, 224x224x3 int8


@pytest.fixture(scope="module")
def common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peer_common", REPO / "peers" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_common"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _frames() -> list[FrameRecord]:
    """Frames of every kind a camera sends: gray and RGB, small and camera-sized, each
    encoding (JPEG at sizes where the replicas decode at a DCT scale)."""
    rng = np.random.default_rng(7)
    frames = []
    for k, (h, w, c) in enumerate([(28, 28, 1), (32, 32, 1), (240, 320, 3), (120, 160, 1),
                                   (481, 641, 3), (60, 90, 3)]):
        shape = (h, w) if c == 1 else (h, w, c)
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        pixels[h // 4 : h // 2, w // 4 : w // 2] = 250  # some structure beside the noise
        for encoding in ("raw", "png", "jpeg"):
            frames.append(FrameRecord(f"cam-{k}", len(frames), 1, encoding, h, w, c,
                                      encode_pixels(pixels, encoding), None))
    return frames


def _camera_frames() -> list[FrameRecord]:
    """The camera regime's frames: RGB JPEG clips of `bench peers --frame-size` (scenes),
    at sizes that decode at DCT scale 1 (320x240), 1/2 (640x480) and 1/2 (1280x720) for 224."""
    from cluster.bench.camera import camera_clip

    frames = []
    for w, h in ((320, 240), (640, 480), (1280, 720)):
        clip, _ = camera_clip(w, h, frames=2)
        frames += [FrameRecord(f"cam-{w}", k, 1, "jpeg", h, w, 3, data, label)
                   for k, (data, label) in enumerate(clip)]
    return frames


@pytest.mark.parametrize("hwc", [(28, 28, 1), (224, 224, 3)])
def test_model_pixels_are_the_replicas(common: ModuleType, hwc: tuple[int, int, int]) -> None:
    for frame in _frames() + _camera_frames():
        ours = common.model_pixels(common.Frame(*frame.row(), "t", 0, 0, 0, 0, None), hwc)
        theirs = frame_pixels(frame, DecodeLimits(), hwc)
        assert ours.dtype == theirs.dtype == np.uint8
        assert np.array_equal(ours, theirs), (frame.encoding, frame.height, frame.width)


@pytest.mark.parametrize("path", [MODEL, RGB_MODEL], ids=["gray-28", "rgb-224"])
def test_classes_and_scores_are_serving_litert_runtimes(common: ModuleType, path: Path) -> None:
    model = common.Model(path, threads=1, max_batch=8)  # several interpreter calls
    runtime = LiteRTRuntime(path)
    frames = _frames() + _camera_frames()
    assert model.hwc == runtime.input_hwc
    pixels = [frame_pixels(f, DecodeLimits(), runtime.input_hwc) for f in frames]
    probs = runtime.predict(batch_input(pixels))
    ids, scores = model.classify(pixels)
    assert ids == probs.argmax(axis=1).tolist()
    assert scores == [float(probs[i, c]) for i, c in enumerate(ids)]
    assert model.info["sha256"] == common.hashlib.sha256(path.read_bytes()).hexdigest()


def test_both_message_forms_parse_to_the_same_frames(common: ModuleType) -> None:
    frame = FrameRecord("cam-3", 12, 1_700_000_000_000_000_000, "png", 0, 0, 0,
                        encode_pixels(np.zeros((32, 32), np.uint8), "png"), 4)
    bare = common.parse_message(frame.data, bare_headers(frame), b"cam-3", "f", 2, 9, 1000, 5)
    arrow = common.parse_message(encode_frames([frame, frame]),
                                 [("content-type", ARROW_CONTENT_TYPE.encode())], b"cam-3",
                                 "f", 2, 10, None, 5)
    assert [f.row for f in arrow] == [0, 1]
    for parsed in (*bare, *arrow):
        assert (parsed.stream_id, parsed.frame_index, parsed.captured_at_ns, parsed.label) == (
            "cam-3", 12, frame.captured_at_ns, 4)
        assert parsed.data == frame.data and parsed.partition == 2
    assert bare[0].timestamp_ns == 1_000_000_000 and arrow[0].timestamp_ns is None
    with pytest.raises(common.BadFrame):
        common.parse_message(b"x", [("content-type", b"text/plain")], None, "f", 0, 0, None, 0)
