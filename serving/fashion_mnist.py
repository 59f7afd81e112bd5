"""The Fashion-MNIST reader: its IDX files, read with numpy alone (no TensorFlow).

Training (jobs), the frame producers (streams) and the serving tests all read the same
files, looked up in this order: ``$FRAMECAST_DATA_DIR``, ``/usr/share/datasets/fashion-mnist``
(Debian package ``dataset-fashion-mnist``), the Keras cache ``~/.keras/datasets/fashion-mnist``.

Why it lives in ``serving``: its two users are ``jobs`` (training data) and ``streams`` (dataset
replay), and the import direction ``cluster -> streams -> serving <- jobs`` gives them exactly
one package in common, the bottom one. ``jobs`` may not import ``streams`` nor the reverse, and
a fifth top-level package for one module would break the design's four rooms (and the Ray
convention that ships them with ``--working-dir .``). Like the artifact format in
``serving/artifacts.py``, it is a format that ``serving`` defines and the others read.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np

from serving.exceptions import DatasetFormatError, DatasetNotFoundError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def search_dirs(data_dir: Path | None = None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    env = os.environ.get("FRAMECAST_DATA_DIR")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs.append(Path("/usr/share/datasets/fashion-mnist"))
    dirs.append(Path.home() / ".keras" / "datasets" / "fashion-mnist")
    return dirs


def _find(name: str, dirs: list[Path]) -> Path | None:
    for directory in dirs:
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped); raise DatasetFormatError on a malformed one."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DatasetFormatError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX body has {len(raw) - header} bytes, header says {expected}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def load_fashion_mnist(
    split: Literal["train", "test"], data_dir: Path | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) of one split."""
    dirs = search_dirs(data_dir)
    image_name, label_name = _FILES[split]
    images_path, labels_path = _find(image_name, dirs), _find(label_name, dirs)
    if images_path is None or labels_path is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found (looked in: {looked}); install the Debian "
            "package dataset-fashion-mnist or set FRAMECAST_DATA_DIR to a directory with the "
            "IDX files"
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{images_path} has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels
