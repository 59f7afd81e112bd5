"""Datasets (fashion-mnist, scenes, folder:PATH, synthetic) as numpy arrays, and tf.data.

Loading (:func:`load_dataset`) is numpy/Pillow only, so it is cheap to call from the driver
and from every Ray Train worker. :func:`make_tf_dataset` imports TensorFlow lazily.

``scenes`` and ``scenes:heldout`` are rendered on demand by :mod:`serving.scenes` (RGB camera
scenes of the Fashion-MNIST garments, ``docs/scenes.md``) at ``input_size`` (default 224);
sets of more than a few hundred images are kept in a cache under
``$FRAMECAST_HOME/datasets/scenes`` keyed by every parameter and the generator's version (a
smaller set is read from a larger cached one: image i does not depend on the set's length).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.exceptions import DatasetError, OptionError
from jobs.names import validate_dataset_name
from serving.exceptions import DatasetFormatError, DatasetNotFoundError
from serving.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from serving.scenes import SCENES_VERSION, GarmentSplit, render_scenes

if TYPE_CHECKING:
    import tensorflow as tf

DATASET_KINDS = ("fashion-mnist", "scenes", "scenes:heldout", "folder:PATH", "synthetic")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
FOLDER_IMAGE_SIZE = (28, 28)
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2000, 500
SYNTHETIC_CLASSES = tuple(f"pattern-{i}" for i in range(10))
SCENES_TRAIN, SCENES_TEST = 10_000, 2_000
DEFAULT_SCENES_SIZE = 224
# Sets smaller than this many pixels render faster than a cache would pay for (tests).
SCENES_CACHE_MIN_PIXELS = 500 * 224 * 224
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 1024


@dataclass(frozen=True)
class Dataset:
    """Train and test images (uint8, NHWC) with integer labels and class names."""

    name: str
    classes: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)


def _validate_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise OptionError(f"limit must be >= 1 when given, got {limit}")


def _validate_input_size(input_size: int | None) -> None:
    if input_size is not None and not MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE:
        raise OptionError(f"input_size must be in {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE} when "
                          f"given, got {input_size}")


def load_dataset(name: str, limit: int | None = None, test_limit: int | None = None,
                 seed: int = 0, input_size: int | None = None) -> Dataset:
    """Load a dataset by name; limit caps the training images, test_limit the test images.

    ``input_size`` is the side of the images: scenes are rendered at it (default 224); the
    other datasets are resized to it when it is given (their channels kept).
    """
    validate_dataset_name(name)
    _validate_limit(limit)
    _validate_limit(test_limit)
    _validate_input_size(input_size)
    if name in ("scenes", "scenes:heldout"):
        return _load_scenes(name, limit, test_limit, seed, input_size or DEFAULT_SCENES_SIZE)
    data = _load_named(name, limit, test_limit, seed)
    if input_size is None or data.input_shape[:2] == (input_size, input_size):
        return data
    return Dataset(data.name, data.classes, resize_images(data.x_train, input_size),
                   data.y_train, resize_images(data.x_test, input_size), data.y_test)


def _load_named(name: str, limit: int | None, test_limit: int | None, seed: int) -> Dataset:
    if name == "fashion-mnist":
        try:
            x_train, y_train = load_fashion_mnist("train", limit=limit)
            x_test, y_test = load_fashion_mnist("test", limit=test_limit)
        except (DatasetNotFoundError, DatasetFormatError) as error:
            raise DatasetError(str(error)) from error
        return Dataset(name, FASHION_MNIST_CLASSES, x_train[..., None], y_train,
                       x_test[..., None], y_test)
    if name == "synthetic":
        train_n = min(limit or SYNTHETIC_TRAIN, 100_000)
        test_n = min(test_limit or SYNTHETIC_TEST, 100_000)
        x_train, y_train = synthetic_images(train_n, seed=seed)
        x_test, y_test = synthetic_images(test_n, seed=seed + 1)
        return Dataset(name, SYNTHETIC_CLASSES, x_train, y_train, x_test, y_test)
    return _load_folder(Path(name[len("folder:"):]), limit, test_limit, seed)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images resized to size x size (bilinear), channels kept."""
    from PIL import Image

    channels = images.shape[3]
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        pixels = image[..., 0] if channels == 1 else image
        resized = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR)
        out[index] = np.asarray(resized).reshape(size, size, channels)
    return out


def _load_scenes(name: str, limit: int | None, test_limit: int | None, seed: int,
                 size: int) -> Dataset:
    style = "heldout" if name == "scenes:heldout" else "train"
    try:
        x_train, y_train = _scenes_split(limit or SCENES_TRAIN, size, seed, style, "train")
        x_test, y_test = _scenes_split(test_limit or SCENES_TEST, size, seed, style, "test")
    except (DatasetNotFoundError, DatasetFormatError) as error:
        raise DatasetError(f"{name} needs the Fashion-MNIST garments: {error}") from error
    return Dataset(name, FASHION_MNIST_CLASSES, x_train, y_train, x_test, y_test)


def scenes_cache_dir() -> Path:
    """Where rendered scenes sets are kept: ``$FRAMECAST_HOME/datasets/scenes``."""
    return Path(os.environ.get("FRAMECAST_HOME", ".framecast")) / "datasets" / "scenes"


def _scenes_split(count: int, size: int, seed: int, style: str,
                  garments: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of a scenes set, from the cache when it was rendered before."""
    split: GarmentSplit = "train" if garments == "train" else "test"
    if count * size * size < SCENES_CACHE_MIN_PIXELS:
        return render_scenes(count, size=(size, size), seed=seed, style=style, garments=split)
    cache = scenes_cache_dir()
    prefix = f"v{SCENES_VERSION}-{style}-{split}-seed{seed}-{size}px-"
    cached = _cached_scenes(cache, prefix, count, size)
    if cached is not None:
        return cached
    images, labels = render_scenes(count, size=(size, size), seed=seed, style=style,
                                   garments=split)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Labels first, images last: a set whose images file exists is complete. Each file
        # is written aside and renamed (atomic), so readers never see half of one.
        for part, array in (("labels", labels), ("images", images)):
            partial = cache / f"{prefix}{count}.{os.getpid()}.partial.npy"
            np.save(partial, array)
            os.replace(partial, cache / f"{prefix}{count}.{part}.npy")
    except OSError:
        pass  # a read-only home: the set is simply rendered again next time
    return images, labels


def _cached_scenes(cache: Path, prefix: str, count: int,
                   size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The first ``count`` images of the smallest cached set holding at least as many (image
    i of a scenes set does not depend on the set's length), or None."""
    lengths = []
    for path in cache.glob(f"{prefix}*.images.npy"):
        digits = path.name[len(prefix):-len(".images.npy")]
        if digits.isdigit() and int(digits) >= count:
            lengths.append(int(digits))
    for length in sorted(lengths):
        try:
            labels = np.load(cache / f"{prefix}{length}.labels.npy")
            images = np.load(cache / f"{prefix}{length}.images.npy", mmap_mode="r")
        except (OSError, ValueError):
            continue  # unreadable (removed meanwhile, or foreign): try the next, or render
        if images.shape == (length, size, size, 3) and labels.shape == (length,):
            return np.array(images[:count]), np.array(labels[:count])
    return None


def synthetic_images(count: int, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 10-class images: class k is a bright bar at one of 10 positions, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count).astype(np.int64)
    images = rng.integers(0, 60, size=(count, size, size, 1)).astype(np.uint8)
    band = size // 5
    for index, label in enumerate(labels):
        horizontal, slot = divmod(int(label), 5)
        start = slot * band
        if horizontal:
            images[index, start:start + band, :, 0] = 220
        else:
            images[index, :, start:start + band, 0] = 220
    return images, labels


def _load_folder(root: Path, limit: int | None, test_limit: int | None,
                 seed: int) -> Dataset:
    if not root.is_dir():
        raise DatasetError(f"folder dataset {root} does not exist (expected class sub-folders)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _folder_classes(root / "train")
        x_train, y_train = _read_class_folders(root / "train", classes)
        x_test, y_test = _read_class_folders(root / "test", classes)
    else:
        classes = _folder_classes(root)
        images, labels = _read_class_folders(root, classes)
        order = np.random.default_rng(seed).permutation(len(labels))
        cut = max(1, round(len(labels) * 0.8))
        x_train, y_train = images[order[:cut]], labels[order[:cut]]
        x_test, y_test = images[order[cut:]], labels[order[cut:]]
        if len(y_test) == 0:
            raise DatasetError(f"folder dataset {root} is too small to hold out a test split")
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    if test_limit is not None:
        x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    return Dataset(f"folder:{root}", classes, x_train, y_train, x_test, y_test)


def _folder_classes(root: Path) -> tuple[str, ...]:
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if len(classes) < 2:
        raise DatasetError(f"folder dataset {root} needs at least 2 class sub-folders, "
                           f"found {len(classes)}")
    return classes


def _read_class_folders(root: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    files = [(path, index) for index, name in enumerate(classes)
             for path in sorted((root / name).iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"folder dataset {root} has no .jpg/.jpeg/.png images")
    decoded: list[Image.Image] = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                decoded.append(image.convert("RGB") if image.mode not in ("L", "RGB")
                               else image.copy())
        except (UnidentifiedImageError, OSError) as error:
            raise DatasetError(f"{path}: not a readable image: {error}") from error
    mode = "L" if all(image.mode == "L" for image in decoded) else "RGB"
    arrays = [np.asarray(image.convert(mode).resize(FOLDER_IMAGE_SIZE), dtype=np.uint8)
              for image in decoded]
    images = np.stack(arrays)
    if images.ndim == 3:
        images = images[..., None]
    labels = np.array([label for _, label in files], dtype=np.int64)
    return images, labels


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded shuffle, then hold out val_fraction of the training images for validation."""
    if not 0.0 < val_fraction < 0.5:
        raise OptionError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = max(1, round(len(y) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def calibration_sample(x: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded sample of training images used as the int8 representative dataset."""
    order = np.random.default_rng(seed).permutation(len(x))[:count]
    return x[np.sort(order)]


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def normalize(images: Any) -> Any:
    """uint8 pixels to float32 in [0, 1] (the paper's normalization); numpy or tf."""
    if isinstance(images, np.ndarray):
        return images.astype(np.float32) / np.float32(255.0)
    import tensorflow as tf

    return tf.cast(images, tf.float32) / 255.0


@dataclass(frozen=True)
class Augmentation:
    """Random affine (rotation, zoom, translation) and horizontal flip, per image."""

    rotation: float = 0.02      # fraction of a full turn (0.02 ~ +-7 degrees)
    zoom: float = 0.05          # relative scale change
    translation: float = 0.06   # fraction of height/width
    flip: bool = True
    color: bool = False         # RGB: channel order, grey, brightness/contrast, noise
    aspect: float = 1.0         # largest width:height stretch either way (1: none)
    whole_pixels: bool = False  # round shifts to whole pixels (with no rotation/zoom: exact)

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is applied."""
        return self.flip or self.color or any(
            v > 0 for v in (self.rotation, self.zoom, self.translation, self.aspect - 1.0))


NO_AUGMENTATION = Augmentation(rotation=0.0, zoom=0.0, translation=0.0, flip=False)
# --augment-policy light: a flip and a shift of whole pixels (up to 2 of 28), nothing that
# interpolates. The standard policy's rotation and zoom resample every 28x28 garment
# bilinearly (a blur the test images never have): optimized_cnn ended its 18 epochs at
# 93.75 % training accuracy on those images against 93.78 % validation, underfitting.
LIGHT_AUGMENTATION = Augmentation(rotation=0.0, zoom=0.0, translation=2.0 / 28.0, flip=True,
                                  whole_pixels=True)
# For camera scenes (train on `scenes`): a garment's colour says nothing of its class, and a
# camera sees it at any size and place. Without these, camera_cnn reached 65.6 % on the scenes
# test split but 14.6 % on scenes:heldout (other tints, sizes, positions).
# The aspect stretch: replicas squash a frame to the model's square input, so a 16:9 camera's
# garments reach the model 1.78x narrower than they are (a 4:3 one's 1.33x); the v3 scenes
# model, trained on square scenes only, got 21 % of 1280x720 frames right against 66 % of
# square ones.
CAMERA_AUGMENTATION = Augmentation(rotation=0.08, zoom=0.3, translation=0.15, flip=True,
                                   color=True, aspect=1.8)


def augment_batch(images: tf.Tensor, aug: Augmentation) -> tf.Tensor:
    """Apply one random affine transform and flip per image of a float NHWC batch."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    if aug.flip:
        flip = tf.random.uniform([batch, 1, 1, 1]) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    if aug.color and images.shape[-1] == 3:
        images = _color_jitter(images)
    if aug.rotation <= 0 and aug.zoom <= 0 and aug.translation <= 0 and aug.aspect <= 1.0:
        return images
    angle = tf.random.uniform([batch], -aug.rotation, aug.rotation) * 2.0 * np.pi
    scale = tf.random.uniform([batch], 1.0 - aug.zoom, 1.0 + aug.zoom)
    tx = tf.random.uniform([batch], -aug.translation, aug.translation) * width
    ty = tf.random.uniform([batch], -aug.translation, aug.translation) * height
    if aug.whole_pixels:
        tx, ty = tf.round(tx), tf.round(ty)
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    scale_x = scale_y = scale
    if aug.aspect > 1.0:  # width:height stretch, log-uniform in [1/aspect, aspect]
        half = tf.sqrt(tf.exp(tf.random.uniform([batch], -1.0, 1.0) * float(np.log(aug.aspect))))
        scale_x, scale_y = scale * half, scale / half
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): the inverse of
    # scaling by (scale_x, scale_y), then rotating.
    a0, a1 = cos / scale_x, -sin / scale_y
    b0, b1 = sin / scale_x, cos / scale_y
    a2 = cx - a0 * cx - a1 * cy - tx
    b2 = cy - b0 * cx - b1 * cy - ty
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms,
        output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT",
    )


def _color_jitter(images: tf.Tensor) -> tf.Tensor:
    """Per image: a random channel order (hues move by thirds), grey 1 in 5, contrast
    0.6-1.4, brightness +-0.2, Gaussian noise of std up to 0.05."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    orders = tf.constant([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    order = tf.gather(orders, tf.random.uniform([batch], 0, 6, dtype=tf.int32))
    images = tf.gather(images, order, axis=3, batch_dims=1)
    grey = tf.broadcast_to(tf.reduce_mean(images, axis=3, keepdims=True), tf.shape(images))
    images = tf.where(tf.random.uniform([batch, 1, 1, 1]) < 0.2, grey, images)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = ((images - mean) * tf.random.uniform([batch, 1, 1, 1], 0.6, 1.4) + mean
              + tf.random.uniform([batch, 1, 1, 1], -0.2, 0.2))
    noise = tf.random.normal(tf.shape(images)) * tf.random.uniform([batch, 1, 1, 1], 0.0, 0.05)
    return tf.clip_by_value(images + noise, 0.0, 1.0)


def make_tf_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, training: bool,
                    seed: int, aug: Augmentation = NO_AUGMENTATION,
                    batch_transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                    ) -> tf.data.Dataset:
    """(Shuffled,) batched, normalized, (augmented,) prefetched tf.data pipeline.

    ``batch_transform`` maps each (images, labels) batch last, after augmentation: the
    training recipe's one-hot labels, erasing, mixing and teacher (jobs/recipe.py).

    The images stay uint8 until a batch is made (normalized a batch at a time): a float32
    cache of every image was 4x the dataset in memory - 7.2 GB for 12,000 224x224x3 scenes.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int64)))
    if training:
        data = data.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size, drop_remainder=False)
    data = data.map(lambda images, labels: (normalize(images), labels),
                    num_parallel_calls=tf.data.AUTOTUNE)
    if training and aug.enabled:
        data = data.map(lambda images, labels: (augment_batch(images, aug), labels),
                        num_parallel_calls=tf.data.AUTOTUNE)
    if batch_transform is not None:
        data = data.map(batch_transform, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return data.with_options(options).prefetch(tf.data.AUTOTUNE)
