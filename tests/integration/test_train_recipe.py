"""One small real Ray Train run (2 workers, MultiWorkerMirroredStrategy) with every recipe
option on: distillation from the shipped optimized model, label smoothing, mixup and CutMix,
random erasing, warm-up and weight averaging, with pruning and the int8 export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jobs.train import CHECKPOINT_AVERAGE, CHECKPOINT_STATE, TrainConfig, train_artifact
from serving.artifacts import load_artifact

TEACHER = Path(__file__).parents[2] / "models" / "fashion_mnist_optimized"
LEARNING_RATE = 4e-3


@pytest.fixture(scope="module")
def recipe_run(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """2 epochs (the first a warm-up) of 288 Fashion-MNIST images on 2 workers: 9 full global
    batches of 32 per epoch (a partial last batch would make the step count uneven).

    Like test_train_ray it runs through this process's driver connection to the session Ray
    head (serve_port makes it).
    """
    root = tmp_path_factory.mktemp("recipe")
    config = TrainConfig(
        model="stream_cnn", dataset="fashion-mnist", epochs=2, out=str(root / "artifact"),
        limit=320, test_limit=200, workers=2, cpus_per_worker=1, batch_size=32,
        prune="constant", target_sparsity=0.5, quantize="int8", max_failures=0,
        storage_path=str(root / "ray"), learning_rate=LEARNING_RATE,
        label_smoothing=0.1, mixup=0.2, cutmix=1.0, random_erasing=0.25, warmup_epochs=1,
        ema=0.9, teacher=str(TEACHER), distill_temperature=2.0,
    )
    epochs: list[dict] = []
    metrics = train_artifact(config, on_epoch=epochs.append)
    return Path(config.out), {"metrics": metrics, "epochs": epochs, "root": root}


def test_the_recipe_run_writes_a_verified_pruned_int8_artifact(
        recipe_run: tuple[Path, dict]) -> None:
    directory, outcome = recipe_run
    manifest = load_artifact(directory).manifest
    assert manifest.model == "stream_cnn" and manifest.training.workers == 2
    assert manifest.input.dtype == "int8"
    # The exported weights are the averages with the masks applied again: exactly the target.
    assert abs(manifest.optimization.measured_sparsity - 0.5) <= 0.02
    metrics = outcome["metrics"]
    assert metrics["samples"] == 200
    assert abs(metrics["accuracy"] - metrics["float"]["accuracy"]) <= 0.1


def test_the_learning_rate_warmed_up_for_the_first_epoch_then_decayed(
        recipe_run: tuple[Path, dict]) -> None:
    _, outcome = recipe_run
    history = outcome["epochs"]
    assert [int(r["epoch"]) for r in history] == [1, 2]
    # An epoch's lr is the one its last step used: step 8, the warm-up's last (9 steps),
    # is at the peak; step 17 is the cosine's 8th of 9 steps (down to alpha = 0.02). Without
    # the warm-up epoch 1 would end part-way down the cosine instead.
    cosine = 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * 8 / 9))
    assert history[0]["lr"] == pytest.approx(LEARNING_RATE, rel=1e-4)
    assert history[1]["lr"] == pytest.approx(LEARNING_RATE * cosine, rel=1e-4)
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and r["loss"] > 0 for r in history)


def test_the_checkpoints_keep_the_weight_averages_beside_the_raw_weights(
        recipe_run: tuple[Path, dict]) -> None:
    import tensorflow as tf

    _, outcome = recipe_run
    checkpoints = sorted(p for p in outcome["root"].glob("ray/stream_cnn-*/checkpoint_*")
                         if p.is_dir())
    assert checkpoints, "the run kept no checkpoint"
    names = [name for name, _ in tf.train.list_variables(
        str(checkpoints[-1] / CHECKPOINT_STATE))]
    assert any(name.startswith(f"{CHECKPOINT_AVERAGE}/") for name in names)
    assert any(name.startswith("model/") for name in names)
