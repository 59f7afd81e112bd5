"""``--source scenes``: cameras filming garments in RGB scenes, pre-rendered and pre-encoded.

Each camera looks at a fixed scene of its own (a :mod:`serving.scenes` backdrop: background,
clutter, lighting, sensor) while Fashion-MNIST garments (test split, so never one a model
trained on ``scenes`` has seen) drift across it, one at a time, replaced every
``hold_frames`` frames; every frame carries the garment's class as its ground truth.

Cameras encode in hardware; a simulation that rendered and encoded 640x480 frames in the
producer would eat the cores the pipeline is measured on. So each camera renders and encodes
a short clip once, before the producer's clock starts (``clip_frames``, about 3 s at 30 fps),
and loops it; :attr:`ScenesSource.prerender_s` says what that cost, and the producer's
summary reports it apart from the sending.

``scenes:heldout`` films the held-out style (other backgrounds, tints and sizes; see
``serving/scenes.py``), for the check that a model generalises beyond its training scenes.
No TensorFlow here: numpy and Pillow only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.exceptions import DatasetFormatError, DatasetNotFoundError
from serving.scenes import (
    Backdrop,
    GarmentSprite,
    SceneStyle,
    compose,
    garment_set,
    garment_side,
    make_backdrop,
    make_sprite,
    validate_size,
)
from streams.exceptions import ProducerOptionError, SourceError
from streams.video import DEFAULT_HOLD_FRAMES, SourceFrame, eased_point

SCENE_SOURCES = {"scenes": "train", "scenes:heldout": "heldout"}
DEFAULT_SCENES_FRAME_SIZE = (640, 480)
DEFAULT_CLIP_FRAMES = 96
# A camera's clip is kept in memory: raw frames (no compression) are cut to this many bytes.
MAX_CLIP_BYTES = 256 * 1024 * 1024
MIN_SQUARE_SIDE = 28  # a single-number --frame-size (the synthetic camera's smallest frame)
_SEGMENT_SEED = 16


def is_scenes_source(source: str) -> bool:
    """Whether ``--source`` names a scenes camera (``scenes`` or ``scenes:heldout``)."""
    return source in SCENE_SOURCES


def parse_frame_size(text: str) -> int | tuple[int, int]:
    """``--frame-size``: ``WxH`` (e.g. 640x480) as (width, height), or one number (a square
    side); ProducerOptionError naming the option otherwise."""
    width, sep, height = text.strip().lower().partition("x")
    try:
        if not sep:
            side = int(width)
            if side < MIN_SQUARE_SIDE:
                raise ProducerOptionError(
                    f"--frame-size must be at least {MIN_SQUARE_SIDE}, got {side}")
            return side
        return validate_size((int(width), int(height)), "--frame-size")
    except ValueError as error:
        detail = str(error) if str(error).startswith("--frame-size") else "expected WxH or N"
        raise ProducerOptionError(f"--frame-size {text!r}: {detail}") from None


@dataclass(frozen=True, slots=True)
class EncodedFrame(SourceFrame):
    """A frame its camera already encoded: ``data`` in ``encoding``.

    ``pixels`` holds no image: it is a zero-strided placeholder that only gives the frame's
    shape (a clip of decoded 640x480 frames would cost a GB of memory). Read ``data``.
    """

    data: bytes
    encoding: str


def _placeholder(width: int, height: int) -> np.ndarray:
    return np.broadcast_to(np.zeros((), dtype=np.uint8), (height, width, 3))


@dataclass(frozen=True, slots=True)
class _Segment:
    """One garment's pass across the camera: what it is and where it goes."""

    label: int
    garment: int
    sprite: GarmentSprite
    start: tuple[float, float]
    end: tuple[float, float]


class ScenesVideo:
    """One camera of ``--source scenes``: a fixed scene with garments drifting across it.

    ``size`` is (width, height). Frames are random access and deterministic: ``frame(t)``
    depends only on ``seed``, ``stream_index``, ``style``, ``size`` and ``t``. The garment
    glides with an eased path from one waypoint to the next and is replaced by another
    (another class, tint, texture and size) every ``hold_frames`` frames.
    """

    def __init__(
        self,
        *,
        size: tuple[int, int] = DEFAULT_SCENES_FRAME_SIZE,
        stream_index: int = 0,
        seed: int = 0,
        hold_frames: int = DEFAULT_HOLD_FRAMES,
        style: SceneStyle = "train",
        data_dir: Path | None = None,
    ) -> None:
        if hold_frames < 1:
            raise ValueError(f"hold_frames must be >= 1, got {hold_frames}")
        self.size = validate_size(size, "frame size")
        self.stream_index = stream_index
        self.seed = seed
        self.hold_frames = hold_frames
        self.style: SceneStyle = style
        self.images, _, self.by_class = garment_set("test", data_dir)
        camera_rng = np.random.default_rng([seed, _SEGMENT_SEED, stream_index])
        self.backdrop: Backdrop = make_backdrop(camera_rng, self.size, style)
        self._segments: dict[int, _Segment] = {}

    def _waypoint(self, rng: np.random.Generator, sprite: GarmentSprite) -> tuple[float, float]:
        width, height = self.size
        room_x, room_y = width - sprite.width, height - sprite.height
        return (float(rng.uniform(min(0, room_x), max(0, room_x))),
                float(rng.uniform(min(0, room_y), max(0, room_y))))

    def segment(self, k: int) -> _Segment:
        """The garment of frames k*hold_frames .. (k+1)*hold_frames - 1."""
        cached = self._segments.get(k)
        if cached is None:
            rng = np.random.default_rng([self.seed, _SEGMENT_SEED, self.stream_index, k])
            label = int(rng.integers(10))
            pool = self.by_class[label]
            garment = int(pool[int(rng.integers(len(pool)))])
            sprite = make_sprite(rng, self.images[garment],
                                 garment_side(rng, self.size, self.style), self.style)
            cached = _Segment(label, garment, sprite, self._waypoint(rng, sprite),
                              self._waypoint(rng, sprite))
            if len(self._segments) > 8:
                self._segments.clear()
            self._segments[k] = cached
        return cached

    def position(self, t: int) -> tuple[int, int]:
        """(x, y) of the garment's top-left corner in frame t."""
        k, step = divmod(t, self.hold_frames)
        segment = self.segment(k)
        return eased_point(segment.start, segment.end, step, self.hold_frames)

    def frame(self, t: int) -> SourceFrame:
        """Frame t: uint8 [H, W, 3] pixels and the garment's class."""
        if t < 0:
            raise ValueError(f"frame index must be >= 0, got {t}")
        segment = self.segment(t // self.hold_frames)
        x, y = self.position(t)
        # The sensor's noise changes every frame (a different crop of the noise field).
        noise = ((t * 7) % 32, (t * 13 + self.stream_index) % 32)
        pixels = compose(self.backdrop, segment.sprite, x, y, noise)
        return SourceFrame(pixels=pixels, label=segment.label)

    def __iter__(self) -> Iterator[SourceFrame]:
        t = 0
        while True:
            yield self.frame(t)
            t += 1


class ScenesSource:
    """``--source scenes`` / ``scenes:heldout``: one :class:`ScenesVideo` per camera, each
    rendered and encoded once into a clip of about ``clip_frames`` frames (whole garment
    passes) that the camera then loops. The producer asks for no more frames than it sends."""

    def __init__(
        self,
        name: str = "scenes",
        *,
        frame_size: tuple[int, int] = DEFAULT_SCENES_FRAME_SIZE,
        seed: int = 0,
        hold_frames: int = DEFAULT_HOLD_FRAMES,
        clip_frames: int = DEFAULT_CLIP_FRAMES,
        encoding: str = "jpeg",
        jpeg_quality: int = 90,
        data_dir: Path | None = None,
    ) -> None:
        if name not in SCENE_SOURCES:
            raise SourceError(f"unknown scenes source {name!r}; expected one of: "
                              f"{', '.join(SCENE_SOURCES)}")
        try:
            self.frame_size = validate_size(frame_size, "--frame-size")
        except ValueError as error:
            raise ProducerOptionError(str(error)) from None
        if hold_frames < 1:
            raise ProducerOptionError(f"hold_frames must be >= 1, got {hold_frames}")
        if clip_frames < 1:
            raise ProducerOptionError(f"clip_frames must be >= 1, got {clip_frames}")
        self.name = name
        self.style: SceneStyle = "heldout" if SCENE_SOURCES[name] == "heldout" else "train"
        self.notes: list[str] = []
        self.seed = seed
        self.hold_frames = hold_frames
        self.encoding = encoding
        self.jpeg_quality = jpeg_quality
        self.data_dir = data_dir
        self.prerender_s = 0.0
        # Whole garment passes, so that the loop's seam is a garment change; a run shorter
        # than one pass (clip_frames < hold_frames) renders just its frames.
        self.clip_frames = (max(1, round(clip_frames / hold_frames)) * hold_frames
                            if clip_frames >= hold_frames else clip_frames)
        width, height = self.frame_size
        if encoding == "raw" and self.clip_frames * width * height * 3 > MAX_CLIP_BYTES:
            self.clip_frames = max(1, MAX_CLIP_BYTES // (width * height * 3))
            self.notes.append(f"raw {width}x{height} frames: each camera loops a clip of "
                              f"{self.clip_frames} frames (memory)")
        try:
            garment_set("test", data_dir)
        except (DatasetNotFoundError, DatasetFormatError, OSError) as error:
            raise SourceError(f"--source {name} needs the Fashion-MNIST garments: {error}"
                              ) from None

    def clip(self, index: int) -> list[EncodedFrame]:
        """Camera ``index``'s clip, rendered and encoded now (counted in prerender_s)."""
        from streams.producers import encode_pixels  # the producers import this module

        started = time.perf_counter()
        width, height = self.frame_size
        shape = _placeholder(width, height)
        video = ScenesVideo(size=self.frame_size, stream_index=index, seed=self.seed,
                            hold_frames=self.hold_frames, style=self.style,
                            data_dir=self.data_dir)
        frames = []
        for t in range(self.clip_frames):
            shot = video.frame(t)
            data = encode_pixels(shot.pixels, self.encoding, self.jpeg_quality)
            frames.append(EncodedFrame(pixels=shape, label=shot.label, data=data,
                                       encoding=self.encoding))
        self.prerender_s += time.perf_counter() - started
        return frames

    def stream(self, index: int) -> Iterator[SourceFrame]:
        """Camera ``index``: its clip, looped (rendered on the first frame asked for)."""
        frames = self.clip(index)
        while True:
            yield from frames
