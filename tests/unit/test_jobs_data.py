"""Datasets, the tf.data pipeline and the model zoo: shapes, errors, and the folder reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.data import (
    Augmentation,
    DatasetError,
    array_sha256,
    calibration_sample,
    load_dataset,
    split_train_val,
    synthetic_images,
)


def test_fashion_mnist_limit_and_shapes() -> None:
    data = load_dataset("fashion-mnist", limit=50, test_limit=20)
    assert data.x_train.shape == (50, 28, 28, 1)
    assert data.x_test.shape == (20, 28, 28, 1)
    assert data.x_train.dtype == np.uint8
    assert len(data.classes) == 10
    assert data.classes[0] == "T-shirt/top"


def test_unknown_and_missing_datasets_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'; expected one of"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_dataset("synthetic", limit=0)


def test_fashion_mnist_missing_files_is_a_dataset_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import serving.fashion_mnist

    monkeypatch.setattr(serving.fashion_mnist, "search_dirs", lambda data_dir=None: [tmp_path])
    with pytest.raises(DatasetError, match="Fashion-MNIST train files not found"):
        load_dataset("fashion-mnist", limit=5)


def test_folder_dataset_reads_class_subfolders(tmp_path: Path) -> None:
    for label, name in enumerate(("cat", "dog")):
        (tmp_path / name).mkdir()
        for index in range(5):
            pixels = np.full((40, 30, 3), 40 + 150 * label + index, dtype=np.uint8)
            suffix = ".png" if index % 2 else ".jpg"
            Image.fromarray(pixels).save(tmp_path / name / f"{index}{suffix}")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    data = load_dataset(f"folder:{tmp_path}", seed=1)
    assert data.classes == ("cat", "dog")
    assert data.x_train.shape == (8, 28, 28, 3)
    assert data.x_test.shape == (2, 28, 28, 3)
    assert sorted(np.concatenate([data.y_train, data.y_test]).tolist()) == [0] * 5 + [1] * 5


def test_folder_dataset_refuses_unreadable_images(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / name / "ok.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg: not a readable image"):
        load_dataset(f"folder:{tmp_path}")


def test_split_calibration_and_hash_are_deterministic() -> None:
    x, y = synthetic_images(100, seed=3)
    _x_tr, y_tr, _x_val, y_val = split_train_val(x, y, 0.1, seed=0)
    assert len(y_val) == 10 and len(y_tr) == 90
    again = split_train_val(x, y, 0.1, seed=0)
    assert np.array_equal(again[3], y_val)
    assert array_sha256(calibration_sample(x, 20, 0)) == array_sha256(calibration_sample(x, 20, 0))
    assert array_sha256(calibration_sample(x, 20, 0)) != array_sha256(calibration_sample(x, 20, 1))
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0.5\)"):
        split_train_val(x, y, 0.7, seed=0)


def test_pipeline_normalizes_and_augments() -> None:
    from jobs.data import make_tf_dataset

    x, y = synthetic_images(64, seed=0)
    plain = next(iter(make_tf_dataset(x, y, 16, training=False, seed=0)))
    images, labels = plain[0].numpy(), plain[1].numpy()
    assert images.shape == (16, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_allclose(images, x[:16] / 255.0, atol=1e-6)
    assert labels.tolist() == y[:16].tolist()
    augmented = next(iter(make_tf_dataset(x, y, 64, training=True, seed=0, aug=Augmentation())))[
        0
    ].numpy()
    assert augmented.shape == (64, 28, 28, 1)
    assert augmented.min() >= 0.0 and augmented.max() <= 1.0 + 1e-6


def test_models_build_with_expected_shapes_and_macs(tmp_path: Path) -> None:
    from jobs.models import ModelSpec, build_model, count_macs

    baseline = build_model(ModelSpec("baseline_cnn"), (28, 28, 1), 10)
    optimized = build_model(ModelSpec("optimized_cnn"), (28, 28, 1), 10)
    assert baseline.output_shape == (None, 10) and optimized.output_shape == (None, 10)
    assert baseline.count_params() == 487_818
    assert count_macs(optimized) * 4 < count_macs(baseline)
    mobilenet = build_model(ModelSpec("mobilenet_v2", alpha=0.35), (28, 28, 1), 10)
    assert mobilenet.output_shape == (None, 10)
    # From scratch its BatchNorm statistics follow the weights (momentum 0.999 left
    # inference-mode accuracy at chance after 5 full epochs).
    norms = [lay for lay in mobilenet.layers if "BatchNormalization" in type(lay).__name__]
    assert norms and {lay.momentum for lay in norms} == {0.9}
    weights = tmp_path / "mnv2.weights.h5"
    mobilenet.save_weights(str(weights))
    reloaded = build_model(
        ModelSpec("mobilenet_v2", alpha=0.35, weights=str(weights)), (28, 28, 1), 10
    )
    first = mobilenet.get_layer("Conv1").kernel.numpy()
    np.testing.assert_array_equal(reloaded.get_layer("Conv1").kernel.numpy(), first)


def test_bad_model_options_are_rejected(tmp_path: Path) -> None:
    from jobs.models import ModelSpec, build_model

    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model(ModelSpec("resnet"), (28, 28, 1), 10)
    with pytest.raises(ValueError, match="--weights is only for mobilenet_v2"):
        build_model(ModelSpec("baseline_cnn", weights="imagenet"), (28, 28, 1), 10)
    with pytest.raises(ValueError, match="does not exist"):
        build_model(ModelSpec("mobilenet_v2", weights=str(tmp_path / "x.h5")), (28, 28, 1), 10)


def test_aspect_augmentation_stretches_width_against_height_within_its_bound() -> None:
    import tensorflow as tf

    from jobs.data import augment_batch

    tf.random.set_seed(3)
    images = np.zeros((64, 64, 64, 1), np.float32)
    images[:, 22:42, 22:42] = 1.0  # a centred 20x20 square
    aug = Augmentation(rotation=0.0, zoom=0.0, translation=0.0, flip=False, aspect=1.8)
    out = augment_batch(tf.constant(images), aug).numpy()[..., 0] > 0.5
    ratios = []
    for mask in out:
        cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
        ratios.append(len(cols) / len(rows))
        # Width up and height down together (the area is kept): never both larger.
        assert not (len(cols) > 21 and len(rows) > 21)
    ratios_arr = np.array(ratios)
    # Square in, stretched out: both ways, and never past 1.8 (+ a pixel of rounding).
    assert ratios_arr.min() < 0.8 and ratios_arr.max() > 1.25
    assert ratios_arr.min() >= 1 / 1.8 - 0.08 and ratios_arr.max() <= 1.8 + 0.15
    # aspect=1 (the default) leaves the same square a square.
    plain = Augmentation(rotation=0.0, zoom=0.0, translation=0.0, flip=False)
    assert not plain.enabled


def test_light_augmentation_flips_and_shifts_by_whole_pixels_only() -> None:
    import tensorflow as tf

    from jobs.data import LIGHT_AUGMENTATION, augment_batch

    tf.random.set_seed(5)
    rng = np.random.default_rng(5)
    images = rng.random((128, 28, 28, 1), dtype=np.float32)
    out = augment_batch(tf.constant(images), LIGHT_AUGMENTATION).numpy()
    moves = set()
    for source, result in zip(images, out, strict=True):
        # Every output is the input, flipped or not, moved by at most 2 whole pixels each
        # way with zeros coming in: nothing is resampled.
        found = None
        for flip in (False, True):
            image = source[:, ::-1] if flip else source
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    shifted = np.zeros_like(image)
                    shifted[max(dy, 0):28 + min(dy, 0), max(dx, 0):28 + min(dx, 0)] = \
                        image[max(-dy, 0):28 - max(dy, 0), max(-dx, 0):28 - max(dx, 0)]
                    if np.allclose(result, shifted, atol=1e-5):
                        found = (flip, dy, dx)
        assert found is not None
        moves.add(found)
    # All kinds happen: flips, both directions, no move.
    assert {flip for flip, _, _ in moves} == {False, True}
    assert {dx for _, _, dx in moves} >= {-2, -1, 0, 1, 2}
    assert {dy for _, dy, _ in moves} >= {-2, -1, 0, 1, 2}
