"""Frame sources for the producers: a synthetic video, a Fashion-MNIST replay, video files.

Every source hands out one independent, endless iterator of :class:`SourceFrame` per camera
(``source.stream(k)``); the producer takes ``--count`` frames from each, paces them and
encodes them. Pixels are uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB).

* :class:`SyntheticVideo` — one Fashion-MNIST garment (test split) drifting smoothly over a
  dark, noisy camera frame; the garment changes every ``hold_frames`` frames and every frame
  carries its ground-truth label. Deterministic for a given seed and camera.
* :class:`FashionMnistReplay` — the test images themselves, as 28x28 frames with labels.
* :class:`VideoFileSource` — a real video file (H.264/H.265/... in MP4/MKV/...) decoded with
  PyAV, sampled at the requested frame rate, at native resolution or shrunk to a maximum side
  (aspect kept); no labels.
* :class:`streams.rtsp.RtspSource` — a live RTSP camera (``rtsp://...``), sampled likewise,
  reconnecting when the stream drops.

No TensorFlow here: numpy, Pillow and PyAV only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from serving.exceptions import DatasetFormatError, DatasetNotFoundError
from serving.fashion_mnist import load_fashion_mnist
from streams.exceptions import SourceError

GARMENT = 28
DEFAULT_FRAME_SIZE = 32
DEFAULT_HOLD_FRAMES = 30
DEFAULT_MAX_SIDE = 0  # native resolution
SOURCE_NAMES = ("synthetic", "fashion-mnist")


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """Pixels of one captured frame and its ground truth, if the source knows it."""

    pixels: np.ndarray
    label: int | None


@dataclass(frozen=True, slots=True)
class SyntheticFrame(SourceFrame):
    """A synthetic frame, with where the garment was drawn (for tests and debugging)."""

    garment: int
    x: int
    y: int


def eased_point(start: tuple[float, float], end: tuple[float, float], step: int,
                steps: int) -> tuple[int, int]:
    """The (x, y) ``step`` of ``steps`` along a cosine-eased glide from start to end: a
    camera's subject speeds up and slows down instead of jumping between waypoints."""
    ease = (1 - math.cos(math.pi * step / steps)) / 2
    (x0, y0), (x1, y1) = start, end
    return round(x0 + (x1 - x0) * ease), round(y0 + (y1 - y0) * ease)


class FrameSource(Protocol):
    """What the producer needs from a source."""

    name: str
    notes: list[str]

    def stream(self, index: int) -> Iterator[SourceFrame]:
        """The endless frame iterator of camera ``index``."""
        ...


def random_shapes(count: int, seed: int = 0) -> np.ndarray:
    """``count`` 28x28 uint8 images of bright random shapes (box, disc, triangle) on black."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:GARMENT, 0:GARMENT]
    images = np.zeros((count, GARMENT, GARMENT), dtype=np.uint8)
    for i in range(count):
        kind = int(rng.integers(3))
        cy, cx = rng.uniform(9, 19, size=2)
        ry, rx = rng.uniform(5, 10, size=2)
        if kind == 0:
            mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        elif kind == 1:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            mask = (yy >= cy - ry) & (yy <= cy + ry) & (np.abs(xx - cx) <= (yy - cy + ry) / 2)
        images[i][mask] = int(rng.integers(120, 256))
    return images


class SyntheticVideo:
    """A camera that films one Fashion-MNIST garment at a time, drifting over a noisy frame.

    The frame is ``frame_size`` x ``frame_size`` grayscale: a dark background (level
    ``background``) with sensor noise (std ``noise``), the 28x28 garment composited on top
    (brighter pixel wins). The garment glides with an eased path between random waypoints and
    is replaced by another test image every ``hold_frames`` frames; each frame's label is the
    drawn garment's class.

    Trade-off of ``frame_size``: the served model takes 28x28 input and a replica resizes the
    *whole* frame to 28x28, so the garment shrinks by ``28 / frame_size`` and classification
    suffers quickly. Measured with a small CNN trained on plain Fashion-MNIST (86% on the test
    set): frame 28 (no motion) 86%, 30 (2 px of travel) 83%, 32 (default, 4 px) 77%, 36 60%,
    40 42%, 48 24%. Larger frames show more motion and cost more bytes per message; keep them
    for load tests, not for accuracy.

    Frames are random access and deterministic: ``frame(t)`` depends only on ``seed``,
    ``stream_index`` and ``t``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        stream_index: int = 0,
        seed: int = 0,
        frame_size: int = DEFAULT_FRAME_SIZE,
        hold_frames: int = DEFAULT_HOLD_FRAMES,
        background: int = 12,
        noise: float = 4.0,
    ) -> None:
        if images.ndim != 3 or images.shape[1:] != (GARMENT, GARMENT) or len(images) == 0:
            raise ValueError(f"images must be uint8 [N, 28, 28] with N > 0, got {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if frame_size < GARMENT:
            raise ValueError(f"frame_size must be >= {GARMENT}, got {frame_size}")
        if hold_frames < 1:
            raise ValueError(f"hold_frames must be >= 1, got {hold_frames}")
        self.images = images
        self.labels = labels
        self.stream_index = stream_index
        self.seed = seed
        self.frame_size = frame_size
        self.hold_frames = hold_frames
        self.background = background
        self.noise = noise
        self._segments: dict[int, tuple[int, float, float]] = {}
        # Sensor noise comes from a fixed bank of fields (frame t uses field t mod 61): the
        # video stays deterministic and a frame costs tens of microseconds, not hundreds.
        bank_rng = np.random.default_rng([seed, stream_index, 2**31])
        self._noise = np.rint(bank_rng.normal(0.0, noise, size=(61, frame_size, frame_size)))
        self._noise = self._noise.astype(np.int16)

    def _segment(self, k: int) -> tuple[int, float, float]:
        """Garment index and start waypoint (y, x) of segment k."""
        cached = self._segments.get(k)
        if cached is None:
            rng = np.random.default_rng([self.seed, self.stream_index, k])
            garment = int(rng.integers(len(self.images)))
            y, x = rng.uniform(0, self.frame_size - GARMENT, size=2)
            cached = garment, float(y), float(x)
            if len(self._segments) > 256:
                self._segments.clear()
            self._segments[k] = cached
        return cached

    def position(self, t: int) -> tuple[int, int]:
        """(x, y) of the garment's top-left corner in frame t."""
        k, step = divmod(t, self.hold_frames)
        _, y0, x0 = self._segment(k)
        _, y1, x1 = self._segment(k + 1)
        return eased_point((x0, y0), (x1, y1), step, self.hold_frames)

    def frame(self, t: int) -> SyntheticFrame:
        """Frame t of this camera."""
        if t < 0:
            raise ValueError(f"frame index must be >= 0, got {t}")
        garment = self._segment(t // self.hold_frames)[0]
        x, y = self.position(t)
        size = self.frame_size
        canvas = np.full((size, size), self.background, dtype=np.int16)
        patch = canvas[y : y + GARMENT, x : x + GARMENT]
        np.maximum(patch, self.images[garment], out=patch)
        canvas += self._noise[t % len(self._noise)]
        pixels = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
        label = None if self.labels is None else int(self.labels[garment])
        return SyntheticFrame(pixels=pixels, label=label, garment=garment, x=x, y=y)

    def __iter__(self) -> Iterator[SyntheticFrame]:
        t = 0
        while True:
            yield self.frame(t)
            t += 1


def _fashion_mnist(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        return load_fashion_mnist("test", data_dir)
    except (DatasetNotFoundError, DatasetFormatError, OSError) as error:
        raise SourceError(str(error)) from None


class SyntheticSource:
    """``--source synthetic``: one :class:`SyntheticVideo` per camera (seeded by camera)."""

    name = "synthetic"

    def __init__(
        self,
        *,
        seed: int = 0,
        frame_size: int = DEFAULT_FRAME_SIZE,
        hold_frames: int = DEFAULT_HOLD_FRAMES,
        data_dir: Path | None = None,
    ) -> None:
        self.notes: list[str] = []
        self.labels: np.ndarray | None
        try:
            self.images, self.labels = _fashion_mnist(data_dir)
        except SourceError as error:
            self.images, self.labels = random_shapes(256, seed), None
            self.notes.append(
                f"Fashion-MNIST not found ({error}); the synthetic video shows random shapes "
                "and carries no ground-truth labels"
            )
        self.seed = seed
        self.frame_size = frame_size
        self.hold_frames = hold_frames
        # Fail on bad parameters now, not in the middle of producing.
        SyntheticVideo(self.images, self.labels, frame_size=frame_size, hold_frames=hold_frames)

    def stream(self, index: int) -> Iterator[SourceFrame]:
        """The synthetic video of camera ``index``."""
        return iter(
            SyntheticVideo(
                self.images,
                self.labels,
                stream_index=index,
                seed=self.seed,
                frame_size=self.frame_size,
                hold_frames=self.hold_frames,
            )
        )


class FashionMnistReplay:
    """``--source fashion-mnist``: test images as 28x28 frames; camera k starts at k * stride."""

    name = "fashion-mnist"

    def __init__(self, *, data_dir: Path | None = None, stride: int = 1000) -> None:
        self.notes: list[str] = []
        self.images, self.labels = _fashion_mnist(data_dir)
        self.stride = stride

    def stream(self, index: int) -> Iterator[SourceFrame]:
        """Test images from (index * stride) on, wrapping around."""
        total = len(self.images)
        position = (index * self.stride) % total
        while True:
            yield SourceFrame(pixels=self.images[position], label=int(self.labels[position]))
            position = (position + 1) % total


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) shrunk to fit max_side with the aspect kept; even, never enlarged;
    max_side 0 keeps the native size."""
    if max_side <= 0:
        return width, height
    scale = min(1.0, max_side / max(width, height))
    new_w = max(2, round(width * scale) // 2 * 2)
    new_h = max(2, round(height * scale) // 2 * 2)
    return (width, height) if scale == 1.0 else (new_w, new_h)


class VideoFileSource:
    """``--source VIDEO_PATH``: a video file decoded with PyAV, RGB, sampled at ``fps``.

    Sampling is sample-and-hold on the stream's timestamps: sample i is the frame on screen at
    ``i / fps`` seconds (frames are skipped when the file is faster, repeated when slower);
    ``fps=0`` takes every decoded frame. Frames larger than ``max_side`` are shrunk with the
    aspect kept (0: native size). Each camera plays the file from the start and loops it.
    """

    def __init__(self, path: Path, *, fps: float, max_side: int = DEFAULT_MAX_SIDE) -> None:
        import av

        if max_side != 0 and max_side < 2:
            raise ValueError(f"max_side must be 0 (native) or >= 2, got {max_side}")
        self.path = Path(path)
        self.name = str(self.path)
        self.notes: list[str] = []
        self.fps = fps
        self.max_side = max_side
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise SourceError(f"{self.path}: no video stream")
                video = container.streams.video[0]
                self.width, self.height = video.codec_context.width, video.codec_context.height
        except (av.FFmpegError, OSError) as error:
            raise SourceError(f"cannot open video {self.path}: {error}") from None

    def _decode_once(self) -> Iterator[np.ndarray]:
        import av

        width, height = fit_within(self.width, self.height, self.max_side)

        def convert(frame: av.VideoFrame) -> np.ndarray:
            return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()

        step = 1.0 / self.fps if self.fps > 0 else 0.0
        next_time = 0.0
        held: av.VideoFrame | None = None
        held_pixels: np.ndarray | None = None
        try:
            with av.open(str(self.path)) as container:
                video = container.streams.video[0]
                video.thread_type = "AUTO"
                duration = 1.0 / float(video.average_rate or 25)
                when = 0.0
                for index, frame in enumerate(container.decode(video)):
                    if step == 0.0:
                        yield convert(frame)
                        continue
                    when = frame.time if frame.time is not None else index * duration
                    while held is not None and next_time < when:
                        if held_pixels is None:
                            held_pixels = convert(held)
                        yield held_pixels
                        next_time += step
                    held, held_pixels = frame, None
                while held is not None and next_time < when + duration:
                    if held_pixels is None:
                        held_pixels = convert(held)
                    yield held_pixels
                    next_time += step
        except av.FFmpegError as error:
            raise SourceError(f"cannot decode video {self.path}: {error}") from None

    def stream(self, index: int) -> Iterator[SourceFrame]:
        """Camera ``index`` plays the file from its start, looping."""
        while True:
            produced = False
            for pixels in self._decode_once():
                produced = True
                yield SourceFrame(pixels=pixels, label=None)
            if not produced:
                raise SourceError(f"{self.path}: the video has no decodable frames")


def open_source(
    source: str,
    *,
    fps: float,
    seed: int = 0,
    frame_size: int = DEFAULT_FRAME_SIZE,
    hold_frames: int = DEFAULT_HOLD_FRAMES,
    max_side: int = DEFAULT_MAX_SIDE,
    data_dir: Path | None = None,
    reconnect_timeout_s: float = 60.0,
) -> FrameSource:
    """The source named by ``--source``: synthetic, fashion-mnist, an rtsp:// camera (given
    up after ``reconnect_timeout_s`` without a frame) or a video file path."""
    from streams.rtsp import RtspSource, is_stream_url, redact_url

    if is_stream_url(source):
        return RtspSource(source, fps=fps, max_side=max_side, give_up_s=reconnect_timeout_s)
    if source == "synthetic":
        return SyntheticSource(
            seed=seed, frame_size=frame_size, hold_frames=hold_frames, data_dir=data_dir
        )
    if source == "fashion-mnist":
        return FashionMnistReplay(data_dir=data_dir)
    path = Path(source)
    if not path.is_file():
        raise SourceError(
            f"--source {redact_url(source)!r} is neither {' nor '.join(SOURCE_NAMES)} "
            "nor an rtsp:// URL nor a video file"
        )
    return VideoFileSource(path, fps=fps, max_side=max_side)
