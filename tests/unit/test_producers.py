"""Frame sources and encodings of the producers, without a broker."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from serving.exceptions import DatasetNotFoundError
from serving.fashion_mnist import load_fashion_mnist
from serving.preprocess import DecodeLimits, decode_image
from streams import video
from streams.frames import FrameRecord
from streams.producers import ProducerError, bare_headers, check_options, encode_pixels
from streams.video import (
    FashionMnistReplay,
    SourceError,
    SyntheticSource,
    SyntheticVideo,
    VideoFileSource,
    fit_within,
    open_source,
    random_shapes,
)


@pytest.fixture(scope="module")
def garments() -> tuple[np.ndarray, np.ndarray]:
    """The first 300 Fashion-MNIST test images and labels."""
    return load_fashion_mnist("test", limit=300)


def write_video(path: Path, frames: int, *, rate: int = 25, width: int = 64, height: int = 48):
    """An MPEG-4 file whose frame i is a flat gray of level 10 * i (for sampling checks)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), 10 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def levels(source: VideoFileSource, n: int) -> list[int]:
    """Mean gray level (rounded to tens) of the first n frames of camera 0."""
    stream = source.stream(0)
    return [int(round(next(stream).pixels.mean() / 10) * 10) for _ in range(n)]


# -- synthetic video ----------------------------------------------------------------------------


def test_synthetic_video_is_deterministic_per_seed_and_camera(garments) -> None:
    images, labels = garments
    first = [SyntheticVideo(images, labels, seed=7, stream_index=1).frame(t) for t in range(40)]
    again = [SyntheticVideo(images, labels, seed=7, stream_index=1).frame(t) for t in range(40)]
    other_seed = SyntheticVideo(images, labels, seed=8, stream_index=1)
    other_camera = SyntheticVideo(images, labels, seed=7, stream_index=2)
    assert all(
        np.array_equal(a.pixels, b.pixels) and a.label == b.label
        for a, b in zip(first, again, strict=True)
    )
    assert any(
        not np.array_equal(f.pixels, other_seed.frame(t).pixels) for t, f in enumerate(first)
    )
    assert any(f.garment != other_camera.frame(t).garment for t, f in enumerate(first))
    iterated = SyntheticVideo(images, labels, seed=7, stream_index=1)
    assert all(np.array_equal(f.pixels, g.pixels) for f, g in zip(first, iterated, strict=False))


def test_synthetic_label_is_the_class_of_the_garment_drawn(garments) -> None:
    images, labels = garments
    clip = SyntheticVideo(images, labels, seed=3, frame_size=36, hold_frames=4)
    for t in range(0, 120, 3):
        frame = clip.frame(t)
        assert frame.pixels.shape == (36, 36) and frame.pixels.dtype == np.uint8
        patch = frame.pixels[frame.y : frame.y + 28, frame.x : frame.x + 28].astype(np.float32)
        errors = np.abs(images.astype(np.float32) - patch).mean(axis=(1, 2))
        # The drawn garment is what is in the frame at (x, y), up to noise and background.
        assert int(errors.argmin()) == frame.garment
        assert errors[frame.garment] < 12.0 < 20.0 < np.partition(errors, 1)[1]
        assert frame.label == int(labels[frame.garment])


def test_synthetic_garment_moves_smoothly_inside_the_frame_and_changes_every_hold(
    garments,
) -> None:
    images, labels = garments
    clip = SyntheticVideo(images, labels, seed=1, frame_size=40, hold_frames=10)
    frames = [clip.frame(t) for t in range(100)]
    positions = [(f.x, f.y) for f in frames]
    assert all(0 <= x <= 12 and 0 <= y <= 12 for x, y in positions)
    assert len(set(positions)) > 10  # it moves
    steps = [max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in itertools.pairwise(positions)]
    assert max(steps) <= 2  # smoothly, also across garment changes
    for t in range(100):
        assert frames[t].garment == frames[t - t % 10].garment
    assert len({frames[t].garment for t in range(0, 100, 10)}) > 5


def test_frame_size_28_is_the_garment_itself(garments) -> None:
    images, labels = garments
    clip = SyntheticVideo(images, labels, frame_size=28, noise=0.0, background=0)
    frame = clip.frame(5)
    assert (frame.x, frame.y) == (0, 0)
    assert np.array_equal(frame.pixels, images[frame.garment])


def test_synthetic_video_refuses_bad_parameters(garments) -> None:
    images, labels = garments
    with pytest.raises(ValueError, match="frame_size"):
        SyntheticVideo(images, labels, frame_size=20)
    with pytest.raises(ValueError, match="labels"):
        SyntheticVideo(images, labels[:10])
    with pytest.raises(ValueError, match="hold_frames"):
        SyntheticVideo(images, labels, hold_frames=0)


def test_synthetic_source_without_the_dataset_draws_shapes_and_says_so(monkeypatch) -> None:
    def missing(*args, **kwargs):
        raise DatasetNotFoundError("Fashion-MNIST test files not found")

    monkeypatch.setattr(video, "load_fashion_mnist", missing)
    source = SyntheticSource(seed=2)
    assert source.notes and "random shapes" in source.notes[0]
    frame = next(source.stream(0))
    assert frame.label is None and frame.pixels.shape == (32, 32)
    with pytest.raises(SourceError, match="not found"):
        FashionMnistReplay()


def test_random_shapes_are_bright_shapes_on_black() -> None:
    shapes = random_shapes(20, seed=4)
    assert shapes.shape == (20, 28, 28) and shapes.dtype == np.uint8
    assert np.array_equal(shapes, random_shapes(20, seed=4))
    for shape in shapes:
        lit = shape > 0
        assert 20 < lit.sum() < 28 * 28 and shape.max() >= 120
        assert not lit[0].any() and not lit[:, 0].any()  # inside the frame, black border


def test_fashion_mnist_replay_gives_each_camera_its_own_slice(garments) -> None:
    replay = FashionMnistReplay(stride=100)
    images, labels = garments
    cam2 = replay.stream(2)
    for i in range(5):
        frame = next(cam2)
        assert np.array_equal(frame.pixels, images[200 + i]) and frame.label == labels[200 + i]


# -- video files --------------------------------------------------------------------------------


def test_video_file_is_sampled_at_the_requested_fps(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", 20)  # 25 fps: 0.8 s, levels 0..190
    assert levels(VideoFileSource(path, fps=5), 4) == [0, 50, 100, 150]
    assert levels(VideoFileSource(path, fps=50), 6) == [0, 0, 10, 10, 20, 20]
    every = levels(VideoFileSource(path, fps=0), 22)
    assert every == [10 * i for i in range(20)] + [0, 10]  # all frames, then it loops


def test_video_frames_are_rgb_and_shrunk_with_the_aspect_kept(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", 3, width=96, height=64)
    frame = next(VideoFileSource(path, fps=0, max_side=48).stream(0))
    assert frame.pixels.shape == (32, 48, 3) and frame.label is None
    big = next(VideoFileSource(path, fps=0, max_side=500).stream(0))
    assert big.pixels.shape == (64, 96, 3)


def test_fit_within_keeps_the_aspect_and_never_enlarges() -> None:
    assert fit_within(1920, 1080, 320) == (320, 180)
    assert fit_within(1080, 1920, 320) == (180, 320)
    assert fit_within(64, 48, 320) == (64, 48)


def test_open_source_refuses_what_is_not_a_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="neither synthetic nor fashion-mnist"):
        open_source(str(tmp_path / "missing.mp4"), fps=30)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(SourceError, match="cannot open video"):
        open_source(str(junk), fps=30)


# -- encodings and options ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 40), (30, 40, 3)])
@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_encoded_pixels_decode_in_the_replica(encoding: str, shape: tuple[int, ...]) -> None:
    yy, xx = np.mgrid[0:30, 0:40]
    gradient = (yy * 4 + xx * 3).astype(np.uint8)
    pixels = gradient if len(shape) == 2 else np.stack([gradient, 255 - gradient, xx * 6], -1)
    pixels = pixels.astype(np.uint8)
    data = encode_pixels(pixels, encoding)
    channels = 1 if len(shape) == 2 else 3
    decoded = decode_image(data, encoding, DecodeLimits(), height=30, width=40, channels=channels)
    assert decoded.shape == (30, 40, channels)
    error = np.abs(decoded.astype(np.int16) - pixels.reshape(30, 40, channels)).mean()
    assert error == 0 if encoding != "jpeg" else error < 3


def test_bare_headers_carry_the_frame_metadata() -> None:
    frame = FrameRecord("cam-1", 7, 123456789, "png", 28, 28, 1, b"x", label=4)
    assert bare_headers(frame) == [
        ("content-type", b"image/png"),
        ("stream_id", b"cam-1"),
        ("frame_index", b"7"),
        ("captured_at_ns", b"123456789"),
        ("label", b"4"),
    ]
    unlabeled = FrameRecord("cam-1", 7, 1, "jpeg", 28, 28, 1, b"x")
    assert [name for name, _ in bare_headers(unlabeled)] == [
        "content-type",
        "stream_id",
        "frame_index",
        "captured_at_ns",
    ]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"encoding": "gif"}, "--encoding must be one of"),
        ({"message_format": "json"}, "--format must be one of"),
        ({"message_format": "bare", "encoding": "raw"}, "not --encoding raw"),
        ({"message_format": "bare", "batch": 4}, "--batch must be 1"),
        ({"fps": -1.0}, "--fps must be >= 0"),
        ({"count": 0}, "--count must be >= 1"),
    ],
)
def test_inconsistent_options_are_refused(options: dict, reason: str) -> None:
    good = {
        "fps": 30.0,
        "streams": 2,
        "count": 10,
        "encoding": "jpeg",
        "message_format": "arrow",
        "batch": 1,
    }
    check_options(**good)
    with pytest.raises(ProducerError, match=reason):
        check_options(**{**good, **options})
