"""The Fashion-MNIST reader (IDX files) behind every Fashion-MNIST consumer."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from serving.exceptions import DatasetFormatError, DatasetNotFoundError, UserError
from serving.fashion_mnist import load_fashion_mnist, read_idx


def _idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())
    return path


def test_reads_what_it_wrote(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(_idx(tmp_path / "a.gz", array)), array)


def test_truncated_body_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(DatasetFormatError, match="header says 10") as excinfo:
        read_idx(path)
    assert isinstance(excinfo.value, ValueError | UserError)


def test_missing_dataset_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.fashion_mnist.search_dirs", lambda data_dir=None: [tmp_path])
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test")


def test_dataset_dir_override_is_used(tmp_path: Path) -> None:
    images = np.full((3, 28, 28), 7, dtype=np.uint8)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3], dtype=np.uint8))
    x, y = load_fashion_mnist("test", data_dir=tmp_path)
    assert x.shape == (3, 28, 28)
    assert y.tolist() == [1, 2, 3]
