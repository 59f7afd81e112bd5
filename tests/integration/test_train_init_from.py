"""``train --init-from``: a real Ray Train run of camera_cnn on 32x32 scenes, then a run at
64x64 that starts from its weights (progressive resizing: train small, fine-tune at the
serving size), and the refusal of a checkpoint whose weights do not fit the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.exceptions import OptionError
from jobs.train import CHECKPOINT_STATE, TrainConfig, train_artifact
from serving.artifacts import load_artifact


def _kernels(checkpoint: Path) -> dict[str, np.ndarray]:
    """The model's trainable kernels in a training checkpoint (not the optimizer's slots)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(checkpoint / CHECKPOINT_STATE))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/") and "/kernel/" in name and "OPTIMIZER_SLOT" not in name}


def _last_checkpoint(storage: Path) -> Path:
    runs = sorted(p for p in storage.glob("camera_cnn-*/checkpoint_*") if p.is_dir())
    assert runs, f"no checkpoint under {storage}"
    return runs[-1]


@pytest.fixture(scope="module")
def small_run(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch at 32x32 on one worker (through the session Ray head: serve_port makes it);
    its last checkpoint."""
    root = tmp_path_factory.mktemp("init-from")
    config = TrainConfig(
        model="camera_cnn", dataset="scenes", input_size=32, epochs=1, limit=60,
        test_limit=20, workers=1, cpus_per_worker=1, batch_size=20, quantize="none",
        max_failures=0, augment=False, out=str(root / "small"), storage_path=str(root / "ray"))
    train_artifact(config)
    return _last_checkpoint(root / "ray")


def test_a_run_at_another_input_size_starts_from_the_checkpoints_weights(
        small_run: Path, tmp_path: Path) -> None:
    assert (small_run.parent / "checkpoint_manager_snapshot.json").exists()  # not taken
    # A learning rate of 1e-12 leaves the weights where they started: the small run's
    # trained ones with --init-from, seed 0's fresh initialisation without it.
    config = TrainConfig(
        model="camera_cnn", dataset="scenes", input_size=64, epochs=1, limit=60,
        test_limit=20, workers=1, cpus_per_worker=1, batch_size=20, quantize="none",
        max_failures=0, augment=False, learning_rate=1e-12,
        init_from=str(small_run.parent),  # the run's directory: its last checkpoint
        out=str(tmp_path / "large"), storage_path=str(tmp_path / "ray"))
    train_artifact(config)
    started, finished = _kernels(small_run), _kernels(_last_checkpoint(tmp_path / "ray"))
    assert started and set(started) == set(finished)
    for name, value in started.items():
        np.testing.assert_allclose(finished[name], value, atol=1e-6, err_msg=name)
    manifest = load_artifact(tmp_path / "large").manifest
    assert manifest.input.shape[1:] == [64, 64, 3]
    assert manifest.training.recipe is not None
    assert manifest.training.recipe["init_from"] == str(small_run)

    # Without --init-from the run would have stayed at seed 0's initialisation, which is not
    # the small run's weights: the comparison above can fail.
    from jobs.tf_env import keras
    from jobs.train import build_training_model

    keras.utils.set_random_seed(0)
    fresh, _ = build_training_model(config, (64, 64, 3), 10, steps_per_epoch=3)
    kernels = [w.numpy() for w in fresh.weights if "kernel" in w.name]
    assert not all(any(k.shape == value.shape and np.allclose(k, value, atol=1e-6)
                       for k in kernels) for value in started.values())


def test_a_checkpoint_of_another_model_is_refused_before_training(
        small_run: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        model="optimized_cnn", dataset="scenes", input_size=32, epochs=1, limit=60,
        test_limit=20, workers=1, batch_size=20, quantize="none", augment=False,
        init_from=str(small_run), out=str(tmp_path / "other"),
        storage_path=str(tmp_path / "ray"))
    with pytest.raises(OptionError, match="--init-from"):
        train_artifact(config)
    assert not (tmp_path / "ray").exists()  # refused before Ray Train started


def test_a_directory_that_is_no_checkpoint_is_refused(tmp_path: Path) -> None:
    config = TrainConfig(model="camera_cnn", dataset="scenes", input_size=32, epochs=1,
                         init_from=str(tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(OptionError, match=r"--init-from .* is not a framecast training"):
        train_artifact(config)
