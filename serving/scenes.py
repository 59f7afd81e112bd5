"""Camera scenes: Fashion-MNIST garments in procedural RGB scenes, any size (numpy + Pillow).

The ``scenes`` dataset and the ``--source scenes`` camera are made here. An image shows one
garment - a 28x28 Fashion-MNIST image, scaled up, colourised and textured (tint, stripes,
checks, dots) - on a procedural background with clutter, under a lighting gradient, through
a slightly blurred, noisy sensor and (for stills) a JPEG round trip. Its label is the
garment's Fashion-MNIST class, so ground truth is exact. Two generators ("styles"):

* ``train`` - the training distribution: linear gradients, rooms (a wall over a floor with
  planks), value-noise textures, "dead leaves" (overlapping discs and boxes), gratings at
  random angles, in muted or (40 %) saturated colours; clutter of boxes and ellipses;
  garments tinted red to cyan (or grey), 30-80 % of the frame's short side, anywhere inside
  the frame, rotated +-25 deg.
* ``heldout`` - a visibly different one for the generalisation check: radial gradients with
  rings, tiled and brick walls, outdoor sky over grass; clutter of triangles, stars and
  lines; garments tinted blue to magenta (or near-black / near-white), either small
  (26-36 %) or large (80-92 %), near the edges and corners (partly cut off), rotated +-40 deg,
  and harsher noise, blur and JPEG.

Garments of style ``train`` come from the Fashion-MNIST train split and those of ``heldout``
from the test split, unless ``garments=`` says otherwise (the scenes test split renders the
train style with test-split garments, so no garment image is shared between train and test).
Every image depends only on ``(seed, style, garment split, size, index)``: the first n images
of a larger call are the n images of a smaller one.

Why it lives in ``serving``: both ``jobs`` (the dataset) and ``streams`` (the camera) use it,
and ``serving`` is their one common package (see ``serving/fashion_mnist.py``).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from serving.fashion_mnist import load_fashion_mnist

SceneStyle = Literal["train", "heldout"]
GarmentSplit = Literal["train", "test"]
STYLES: tuple[SceneStyle, ...] = ("train", "heldout")
DEFAULT_SIZE = (224, 224)
MIN_SIDE, MAX_SIDE = 16, 4096
_STYLE_ID = {"train": 1, "heldout": 2}
_SPLIT_ID = {"train": 1, "test": 2}
_NOISE_MARGIN = 32
# Bumped whenever the images a (seed, style, size, index) renders change: cached sets
# (jobs/data.py) are keyed by it.
SCENES_VERSION = 4


@dataclass(frozen=True, slots=True)
class _StyleSpec:
    """The ranges one generator draws from."""

    backgrounds: tuple[str, ...]
    clutter: tuple[str, ...]
    hues: tuple[float, float]            # garment tint hue range (0..1)
    scales: tuple[tuple[float, float], ...]  # garment side / short side, one range per mode
    edge_bias: bool                      # garments near edges/corners, partly cut off
    rotation_deg: float
    noise_std: tuple[float, float]
    blur: tuple[float, float]            # Gaussian radius at 224 px
    jpeg_quality: tuple[int, int]


_SPECS: dict[str, _StyleSpec] = {
    "train": _StyleSpec(
        backgrounds=("gradient", "room", "texture", "leaves", "grating"),
        clutter=("box", "ellipse"),
        hues=(0.0, 0.55),
        scales=((0.30, 0.80),),
        edge_bias=False,
        rotation_deg=25.0,
        noise_std=(0.0, 8.0),
        blur=(0.0, 1.2),
        jpeg_quality=(45, 95),
    ),
    "heldout": _StyleSpec(
        backgrounds=("radial", "tiles", "outdoor"),
        clutter=("triangle", "star", "line"),
        hues=(0.58, 0.95),
        scales=((0.26, 0.36), (0.80, 0.92)),
        edge_bias=True,
        rotation_deg=40.0,
        noise_std=(4.0, 12.0),
        blur=(0.5, 1.8),
        jpeg_quality=(25, 70),
    ),
}


def validate_size(size: tuple[int, int], what: str = "size") -> tuple[int, int]:
    """(width, height) as ints, or ValueError naming ``what`` when a side is out of range."""
    try:
        width, height = (int(side) for side in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (width, height), got {size!r}") from None
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"{what} sides must be in {MIN_SIDE}..{MAX_SIDE}, got {width}x{height}")
    return width, height


def validate_style(style: str) -> SceneStyle:
    """The style, or ValueError naming the choices."""
    if style == "train":
        return "train"
    if style == "heldout":
        return "heldout"
    raise ValueError(f"unknown scene style {style!r}; expected one of: {', '.join(STYLES)}")


@functools.lru_cache(maxsize=4)
def garment_set(split: GarmentSplit, data_dir: Path | None = None
                ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """(images [N,28,28], labels [N], indices of each class) of one Fashion-MNIST split."""
    images, labels = load_fashion_mnist(split, data_dir)
    by_class = tuple(np.flatnonzero(labels == k) for k in range(10))
    return images, labels, by_class


@functools.lru_cache(maxsize=8)
def _noise_bank(width: int, height: int) -> np.ndarray:
    """A fixed field of unit Gaussian noise; images take random crops of it (fast, seeded)."""
    rng = np.random.default_rng(20_240_601)
    return rng.standard_normal((height + _NOISE_MARGIN, width + _NOISE_MARGIN, 3),
                               dtype=np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One RGB colour (float32, 0..255) from hue, saturation, value in 0..1."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float],
                   value: tuple[float, float]) -> np.ndarray:
    return _hsv(float(rng.random()), float(rng.uniform(*saturation)), float(rng.uniform(*value)))


def _value_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Smooth noise in 0..1, float32 [H, W]: a coarse random grid upsampled bicubically."""
    grid_w = max(2, cells)
    grid_h = max(2, round(cells * height / width))
    coarse = rng.random((grid_h, grid_w), dtype=np.float32)
    smooth = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(smooth, dtype=np.float32), 0.0, 1.0)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of colours a and b by t ([H, W] in 0..1) -> uint8 [H, W, 3].

    Through a 256-entry palette: one table look-up per pixel instead of float arithmetic
    on every channel (a quarter of the time at 224 px).
    """
    steps = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None]
    palette = np.clip(a + (b - a) * steps, 0, 255).astype(np.uint8)
    index = (np.clip(t, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    mixed: np.ndarray = np.take(palette, index, axis=0)
    return mixed


def _background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] background of one family."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    muted = ((0.0, 0.45), (0.2, 0.9))
    vivid = ((0.4, 1.0), (0.25, 1.0))
    if kind in _TRAIN_FAMILIES and rng.random() < 0.4:
        muted = vivid  # the training families come in saturated colours too
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xs * math.cos(angle) + ys * math.sin(angle))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        t = 0.85 * t + 0.15 * _value_noise(rng, width, height, int(rng.integers(3, 8)))
        return _mix(_random_colour(rng, *muted), _random_colour(rng, *muted), t)
    if kind == "room":
        split = int(height * rng.uniform(0.3, 0.7))
        wall_t = 0.5 * ys[:split] + 0.15 * _value_noise(rng, width, split,
                                                         int(rng.integers(4, 12)))[:split]
        wall = _mix(_random_colour(rng, *muted), _random_colour(rng, *muted), wall_t)
        depth = np.maximum(ys[split:] - ys[split - 1, 0], 1e-3)
        planks = 0.5 + 0.5 * np.sign(np.sin(float(rng.uniform(2.0, 6.0)) / depth))
        floor_t = np.broadcast_to(0.25 * planks + 0.1 * (1 - depth), (height - split, width))
        floor = _mix(_random_colour(rng, *muted), _random_colour(rng, *muted), floor_t)
        return np.concatenate([wall, floor], axis=0)
    if kind == "texture":
        t = 0.65 * _value_noise(rng, width, height, int(rng.integers(3, 7)))
        t += 0.35 * _value_noise(rng, width, height, int(rng.integers(12, 32)))
        return _mix(_random_colour(rng, *muted), _random_colour(rng, *muted), t)
    if kind == "leaves":
        # Dead leaves: overlapping discs and boxes of every size, the sharp-edged statistics
        # of cluttered natural scenes, drawn at the caller's (half) resolution.
        ground = tuple(int(c) for c in _random_colour(rng, *muted))
        image = Image.new("RGB", (width, height), ground)
        draw = ImageDraw.Draw(image)
        short = min(width, height)
        for _ in range(int(rng.integers(25, 70))):
            colour = tuple(int(c) for c in _random_colour(rng, *muted))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            r = short * 0.5 * float(rng.uniform(0.03, 0.35)) ** 1.5 * 2.5
            box = (cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r)
            if rng.random() < 0.5:
                draw.ellipse(box, fill=colour)
            else:
                draw.rectangle(box, fill=colour)
        return np.asarray(image)
    if kind == "grating":
        # One or two gratings at random angles and frequencies, smooth or hard-edged: walls,
        # blinds, fabrics - periodic structure of any orientation.
        t = np.zeros((height, width), dtype=np.float32)
        count = int(rng.integers(1, 3))
        for _ in range(count):
            angle = rng.uniform(0, math.pi)
            cycles = float(rng.uniform(3.0, 30.0))
            wave = np.sin((xs * math.cos(angle) * width / max(width, height)
                           + ys * math.sin(angle) * height / max(width, height))
                          * np.float32(2 * math.pi * cycles) + np.float32(rng.uniform(0, 6.3)))
            if rng.random() < 0.5:
                wave = np.sign(wave)
            t += (0.5 + 0.5 * wave) / count
        return _mix(_random_colour(rng, *muted), _random_colour(rng, *muted), t)
    vivid = ((0.4, 1.0), (0.25, 1.0))
    if kind == "radial":
        cx, cy = (float(v) for v in rng.uniform(0.2, 0.8, size=2))
        r = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        rings = 0.5 + 0.5 * np.sin(r * float(rng.uniform(15.0, 45.0)))
        t = np.clip(0.7 * r / max(float(r.max()), 1e-6) + 0.3 * rings, 0.0, 1.0)
        return _mix(_random_colour(rng, *vivid), _random_colour(rng, *vivid), t)
    if kind == "tiles":
        tile = max(4, int(min(width, height) * rng.uniform(0.06, 0.2)))
        grout_px = max(1, tile // 10)
        brick = bool(rng.integers(2))
        rows = np.arange(height)
        cols = np.arange(width)
        odd_row = ((rows // tile) % 2 == 1) & brick
        # Per column, for even and odd rows of tiles (bricks shift odd rows by half a tile):
        # 0/1 which tile colour, 2 grout.
        def columns(shift: int) -> np.ndarray:
            c = cols + shift
            return np.where(c % tile < grout_px, 2, (c // tile) % 2).astype(np.uint8)
        even, odd = columns(0), columns(tile // 2)
        code = np.where(odd_row[:, None], odd[None, :], even[None, :])
        code ^= ((rows // tile) % 2 == 1).astype(np.uint8)[:, None] & (code < 2)
        code[rows % tile < grout_px] = 2
        palette = np.stack([_random_colour(rng, *vivid), _random_colour(rng, *vivid) * 0.8,
                            _random_colour(rng, (0.0, 0.3), (0.7, 1.0))])
        tiled: np.ndarray = np.take(np.clip(palette, 0, 255).astype(np.uint8), code, axis=0)
        return tiled
    if kind == "outdoor":
        split = int(height * rng.uniform(0.35, 0.65))
        sky_t = np.broadcast_to(ys[:split] / max(float(ys[split - 1, 0]), 1e-3),
                                (split, width))
        sky = _mix(_hsv(rng.uniform(0.55, 0.62), 0.5, 0.95), _hsv(0.58, 0.15, 1.0), sky_t)
        grass_t = _value_noise(rng, width, height - split, int(rng.integers(40, 80)))
        grass = _mix(_hsv(rng.uniform(0.2, 0.33), 0.7, 0.35), _hsv(0.15, 0.6, 0.6), grass_t)
        return np.concatenate([sky, grass], axis=0)
    raise ValueError(f"unknown background {kind!r}")


def _draw_clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, kinds: tuple[str, ...],
                  width: int, height: int, count: int, max_frac: float) -> None:
    """Distractor shapes: boxes, ellipses, triangles, stars, lines in random colours."""
    short = min(width, height)
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        colour = tuple(int(c) for c in _random_colour(rng, (0.0, 1.0), (0.1, 1.0)))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = short * rng.uniform(0.04, max_frac) / 2
        if kind == "box":
            draw.rectangle((cx - r, cy - r * rng.uniform(0.4, 1.6), cx + r, cy + r), fill=colour)
        elif kind == "ellipse":
            draw.ellipse((cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r), fill=colour)
        elif kind in ("triangle", "star"):
            points = 3 if kind == "triangle" else 10
            turn = rng.uniform(0, 2 * math.pi)
            polygon = []
            for k in range(points):
                radius = r if kind == "triangle" or k % 2 == 0 else r * 0.45
                a = turn + 2 * math.pi * k / points
                polygon.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
            draw.polygon(polygon, fill=colour)
        else:
            a = rng.uniform(0, math.pi)
            dx, dy = 2 * r * math.cos(a), 2 * r * math.sin(a)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour,
                      width=max(1, int(short * rng.uniform(0.01, 0.03))))


@dataclass(frozen=True, slots=True)
class GarmentSprite:
    """A colourised, textured, rotated garment, ready to composite:
    ``frame = frame * see_through + rgb``."""

    rgb: np.ndarray           # float32 [h, w, 3], premultiplied by alpha
    see_through: np.ndarray   # float32 [h, w, 3], 1 - alpha (per channel: whole-row loops)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def make_sprite(rng: np.random.Generator, garment: np.ndarray, side: int, style: SceneStyle
                ) -> GarmentSprite:
    """The 28x28 garment scaled to ``side`` px, flipped, rotated, tinted and textured."""
    spec = _SPECS[style]
    image = Image.fromarray(garment)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Rotated at 56 px in grey, then scaled to the final size once: Pillow's rotation of a
    # large or RGBA image costs several times this, and a 28 px garment has no more detail.
    angle = float(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
    image = image.resize((56, 56), Image.Resampling.BICUBIC).rotate(
        angle, resample=Image.Resampling.BILINEAR, expand=True)
    scale = side / 56.0
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    grey = np.asarray(image)
    # Tint: mostly coloured within the style's hues, sometimes grey (train) or near
    # black/white (heldout).
    if rng.random() < 0.8:
        tint = _hsv(float(rng.uniform(*spec.hues)), float(rng.uniform(0.35, 1.0)),
                    float(rng.uniform(0.45, 1.0)))
    elif style == "train":
        tint = np.full(3, rng.uniform(90, 230), dtype=np.float32)
    else:
        tint = np.full(3, rng.choice([rng.uniform(20, 60), rng.uniform(235, 255)]),
                       dtype=np.float32)
    second = tint * np.float32(rng.uniform(0.35, 0.7))
    # Everything per pixel comes from tables of (pattern bit, grey level): the premultiplied
    # colour and the see-through share - one look-up each, not a chain of float operations.
    levels = np.arange(256, dtype=np.float32)
    alpha = np.minimum(levels * np.float32(4.0 / 255.0), np.float32(1.0))
    brightest = max(float(grey.max()), 1.0)
    shading = np.float32(0.3) + np.float32(0.7) * np.minimum(levels / np.float32(brightest),
                                                             np.float32(1.0))
    weight = (shading * alpha)[:, None]
    colours = np.concatenate([weight * tint, weight * second]).astype(np.float32)
    see_through = np.take(np.repeat((np.float32(1.0) - alpha)[:, None], 3, axis=1), grey,
                          axis=0)
    pattern = int(rng.integers(4))  # plain, stripes, checks, dots
    if pattern == 0:
        return GarmentSprite(rgb=np.take(colours, grey, axis=0), see_through=see_through)
    period = max(3.0, side * rng.uniform(0.07, 0.16))
    a = rng.uniform(0, math.pi)
    yy = np.arange(grey.shape[0], dtype=np.float32)[:, None] / np.float32(period)
    xx = np.arange(grey.shape[1], dtype=np.float32)[None, :] / np.float32(period)
    u = xx * np.float32(math.cos(a)) + yy * np.float32(math.sin(a))
    u -= np.floor(u)  # the fractional part: floor is a fraction of np.remainder's cost
    if pattern == 1:
        mask = u < 0.5
    else:
        v = yy * np.float32(math.cos(a)) - xx * np.float32(math.sin(a))
        v -= np.floor(v)
        mask = ((u < 0.5) ^ (v < 0.5)) if pattern == 2 else (
            (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.08)
    index = grey.astype(np.intp)
    index[mask] += 256
    return GarmentSprite(rgb=np.take(colours, index, axis=0), see_through=see_through)


@dataclass(frozen=True, slots=True)
class Lighting:
    """A scene's light: a brightness ramp across the frame times a colour cast."""

    light: np.ndarray       # float32 [H, W, 3], multiplies the frame

    @classmethod
    def draw(cls, rng: np.random.Generator, width: int, height: int) -> Lighting:
        ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)
        xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)
        # Python floats, not numpy float64 scalars: float32 arrays stay float32 (NEP 50).
        gx, gy = (float(v) for v in rng.uniform(-0.5, 0.5, size=2))
        vignette = float(rng.uniform(0.0, 0.6))
        # Separable: a row term plus a column term, one [H, W] operation.
        rows = float(rng.uniform(0.7, 1.2)) + gy * ys - vignette * ys * ys
        cols = gx * xs - vignette * xs * xs
        cast = (1.0 + rng.uniform(-0.08, 0.08, size=3)).astype(np.float32)
        # light[y, x, c] = (rows[y] + cols[x]) * cast[c], built as [H, W*3] rows so that
        # numpy's inner loops run along whole rows, not along the three channels.
        light = rows[:, None] * np.tile(cast, width)[None, :]
        light += (cols[:, None] * cast[None, :]).reshape(1, width * 3)
        np.maximum(light, np.float32(0.2), out=light)
        return cls(light=light.reshape(height, width, 3))


@dataclass(frozen=True, slots=True)
class Backdrop:
    """What a camera sees before the garment: background with clutter; its light and sensor."""

    pixels: np.ndarray      # uint8 [H, W, 3]: background and clutter, unlit
    lighting: Lighting
    blur: float             # optical blur in px (0 = sharp)
    noise_std: float        # sensor noise, grey levels


# Families drawn at half resolution and scaled up (smooth ones: a quarter of the arithmetic).
_HALF_RES = {"gradient", "room", "texture", "leaves", "grating", "radial", "outdoor"}
# The training style's families (they may draw saturated palettes too).
_TRAIN_FAMILIES = {"gradient", "room", "texture", "leaves", "grating"}


def make_backdrop(rng: np.random.Generator, size: tuple[int, int], style: SceneStyle
                  ) -> Backdrop:
    """A background of the style's families with clutter, its lighting and sensor."""
    width, height = size
    spec = _SPECS[style]
    kind = spec.backgrounds[int(rng.integers(len(spec.backgrounds)))]
    if kind in _HALF_RES and min(width, height) >= 64:
        half = _background(rng, kind, (width + 1) // 2, (height + 1) // 2)
        # Doubled by repetition (nearest): the families are smooth at two pixels, and the
        # camera's softness and noise come later (a bilinear resample costs several times).
        image = Image.fromarray(half).resize((width, height), Image.Resampling.NEAREST)
    else:
        image = Image.fromarray(_background(rng, kind, width, height))
    _draw_clutter(rng, ImageDraw.Draw(image), spec.clutter, width, height,
                  int(rng.integers(1, 7)), 0.3)
    blur = float(rng.uniform(*spec.blur)) if rng.random() < 0.6 else 0.0
    return Backdrop(
        pixels=np.asarray(image),
        lighting=Lighting.draw(rng, width, height),
        blur=blur * min(width, height) / 224.0,
        noise_std=float(rng.uniform(*spec.noise_std)),
    )


def garment_side(rng: np.random.Generator, size: tuple[int, int], style: SceneStyle) -> int:
    """The garment's side in px: a fraction of the frame's short side from the style's range."""
    scales = _SPECS[style].scales
    low, high = scales[int(rng.integers(len(scales)))]
    return max(8, round(min(size) * rng.uniform(low, high)))


def garment_position(rng: np.random.Generator, size: tuple[int, int], sprite: GarmentSprite,
                     style: SceneStyle) -> tuple[int, int]:
    """Top-left (x, y): anywhere inside the frame, or (heldout) near an edge, partly cut off."""
    width, height = size
    room_x, room_y = width - sprite.width, height - sprite.height
    if not _SPECS[style].edge_bias:
        x = rng.uniform(min(0, room_x), max(0, room_x))
        y = rng.uniform(min(0, room_y), max(0, room_y))
        return round(x), round(y)
    # Hug an edge or a corner; up to 15 % of the sprite may fall outside the frame.
    over_x, over_y = 0.15 * sprite.width, 0.15 * sprite.height
    near = [(-over_x, min(0, room_x) + 0.15 * width), (max(0, room_x) - 0.15 * width,
                                                      room_x + over_x)]
    near_y = [(-over_y, min(0, room_y) + 0.15 * height), (max(0, room_y) - 0.15 * height,
                                                          room_y + over_y)]
    lo, hi = near[int(rng.integers(2))]
    x = rng.uniform(min(lo, hi), max(lo, hi))
    lo, hi = near_y[int(rng.integers(2))]
    y = rng.uniform(min(lo, hi), max(lo, hi))
    if rng.random() < 0.3:  # an edge rather than a corner: free along one axis
        x = rng.uniform(min(0, room_x), max(0, room_x))
    return round(x), round(y)


_SOFTEN_PASSES = 6


def _soften(image: np.ndarray) -> None:
    """One separable [1 2 1] / 4 binomial pass over a float [H, W, C] image, in place.

    A few numpy operations: a tenth of the instructions of a Pillow resample or blur.
    """
    for axis in (0, 1):
        body = [slice(None)] * 3
        before, after, middle = list(body), list(body), list(body)
        before[axis], after[axis], middle[axis] = (slice(None, -2), slice(2, None),
                                                   slice(1, -1))
        inner = image[tuple(middle)]
        edges = image[tuple(before)] + image[tuple(after)]
        inner *= np.float32(0.5)
        edges *= np.float32(0.25)
        inner += edges


def compose(backdrop: Backdrop, sprite: GarmentSprite, x: int, y: int,
            noise_offset: tuple[int, int]) -> np.ndarray:
    """One frame: the garment over the backdrop at (x, y), blurred, lit, noisy -> uint8 RGB."""
    frame = backdrop.pixels.copy()
    height, width = frame.shape[:2]
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + sprite.width), min(height, y + sprite.height)
    if x1 > x0 and y1 > y0:
        region = frame[y0:y1, x0:x1] * sprite.see_through[y0 - y:y1 - y, x0 - x:x1 - x]
        region += sprite.rgb[y0 - y:y1 - y, x0 - x:x1 - x]
        frame[y0:y1, x0:x1] = np.clip(region, 0, 255)
    passes = round(backdrop.blur ** 2 / 0.5)  # a [1 2 1] pass has a sigma of 0.71 px
    if passes > _SOFTEN_PASSES:
        # Strong blur (large frames): down by (1 + blur) and back up (bilinear).
        image = Image.fromarray(frame)
        factor = 1.0 + backdrop.blur
        small = (max(1, round(width / factor)), max(1, round(height / factor)))
        image = image.resize(small, Image.Resampling.BOX).resize(
            (width, height), Image.Resampling.BILINEAR)
        frame = np.asarray(image)
    # Optical softness, light, then the sensor's noise, in float over the frame.
    out = frame.astype(np.float32)
    for _ in range(passes if passes <= _SOFTEN_PASSES else 0):
        _soften(out)
    out *= backdrop.lighting.light
    if backdrop.noise_std > 0:
        oy, ox = noise_offset
        noise = _noise_bank(width, height)[oy:oy + height, ox:ox + width]
        out += noise * np.float32(backdrop.noise_std)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def jpeg_round_trip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """The pixels as a camera's JPEG of that quality would show them."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def noise_offset(rng: np.random.Generator) -> tuple[int, int]:
    """A random crop of the noise bank."""
    oy, ox = rng.integers(0, _NOISE_MARGIN, size=2)
    return int(oy), int(ox)


def class_order(seed: int, style: SceneStyle, split: GarmentSplit, block: int) -> np.ndarray:
    """The labels of images 10*block .. 10*block+9: each class once, in a seeded order."""
    rng = np.random.default_rng([seed, _STYLE_ID[style], _SPLIT_ID[split], block, 10])
    return rng.permutation(10)


def render_scene(index: int, *, size: tuple[int, int], seed: int, style: SceneStyle,
                 split: GarmentSplit, data_dir: Path | None = None) -> tuple[np.ndarray, int]:
    """Image ``index`` of a scenes set: uint8 [H, W, 3] and its label."""
    images, _, by_class = garment_set(split, data_dir)
    label = int(class_order(seed, style, split, index // 10)[index % 10])
    rng = np.random.default_rng([seed, _STYLE_ID[style], _SPLIT_ID[split], index])
    pool = by_class[label]
    garment = images[pool[int(rng.integers(len(pool)))]]
    backdrop = make_backdrop(rng, size, style)
    sprite = make_sprite(rng, garment, garment_side(rng, size, style), style)
    x, y = garment_position(rng, size, sprite, style)
    pixels = compose(backdrop, sprite, x, y, noise_offset(rng))
    spec = _SPECS[style]
    if rng.random() < 0.8:
        pixels = jpeg_round_trip(pixels, int(rng.integers(*spec.jpeg_quality)))
    return pixels, label


def render_scenes(count: int, *, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0,
                  style: str = "train", garments: GarmentSplit | None = None,
                  data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` scenes: uint8 [count, H, W, 3] (size is (width, height)) and int64 labels.

    ``garments`` picks the Fashion-MNIST split the garments come from (default: train for
    style ``train``, test for ``heldout``). Deterministic per (seed, style, garments, size):
    image i is the same whatever ``count``.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    width, height = validate_size(size)
    chosen = validate_style(style)
    split: GarmentSplit = garments or ("train" if chosen == "train" else "test")
    if split not in _SPLIT_ID:
        raise ValueError(f"garments must be 'train' or 'test', got {split!r}")
    images = np.empty((count, height, width, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for index in range(count):
        images[index], labels[index] = render_scene(
            index, size=(width, height), seed=seed, style=chosen, split=split,
            data_dir=data_dir)
    return images, labels
