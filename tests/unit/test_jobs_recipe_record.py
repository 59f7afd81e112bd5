"""The artifact manifest says how the model was made: training.recipe (jobs/train.py
recipe_record) holds every recipe option and identifies the teacher."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from jobs.config import TrainConfig
from jobs.train import recipe_record
from serving.artifacts import ArtifactManifest, InputSpec, Training

SHIPPED = Path(__file__).parents[2] / "models"


def _training(recipe: dict | None) -> Training:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    return Training(dataset="synthetic", epochs=1, workers=1, seed=0, started_at=now,
                    finished_at=now, recipe=recipe)


def test_a_plain_run_records_every_ingredient_off(tmp_path: Path) -> None:
    config = TrainConfig(model="stream_cnn", dataset="synthetic", epochs=3, out=str(tmp_path))
    assert recipe_record(config) == {
        "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "random_erasing": 0.0,
        "warmup_epochs": 0, "ema": 0.0, "teacher": None, "distill_alpha": None,
        "distill_temperature": None, "augment": True, "augment_policy": "standard",
        "init_from": None, "batch_size": 128,
        "learning_rate": 0.002, "lr_schedule": "cosine"}


def test_the_recipe_and_the_teacher_are_recorded_and_survive_the_manifest(
        tmp_path: Path) -> None:
    teacher = SHIPPED / "fashion_mnist_optimized"
    raw = (teacher / "manifest.json").read_bytes()
    shipped = json.loads(raw)
    config = TrainConfig(model="stream_cnn", dataset="fashion-mnist", epochs=15,
                         out=str(tmp_path), label_smoothing=0.1, mixup=0.2, cutmix=1.0,
                         random_erasing=0.5, warmup_epochs=2, ema=0.999,
                         teacher=str(teacher), distill_temperature=3.0)
    recipe = recipe_record(config)
    assert recipe["teacher"] == {
        "path": str(teacher), "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "name": shipped["name"], "version": shipped["version"],
        "accuracy": shipped["metrics"]["accuracy"],
        "accuracy_runtime": shipped["metrics"]["runtime"]}
    assert {k: recipe[k] for k in ("label_smoothing", "mixup", "cutmix", "random_erasing",
                                   "warmup_epochs", "ema", "distill_alpha",
                                   "distill_temperature")} == {
        "label_smoothing": 0.1, "mixup": 0.2, "cutmix": 1.0, "random_erasing": 0.5,
        "warmup_epochs": 2, "ema": 0.999, "distill_alpha": 0.5, "distill_temperature": 3.0}
    manifest = ArtifactManifest(name="n", version="v", model="stream_cnn", classes=["a", "b"],
                                input=InputSpec(shape=[-1, 28, 28, 1], dtype="int8"),
                                training=_training(recipe))
    again = ArtifactManifest.model_validate_json(manifest.model_dump_json())
    assert again.training.recipe == recipe


def test_a_teacher_without_a_readable_manifest_is_still_named(tmp_path: Path) -> None:
    config = TrainConfig(model="stream_cnn", dataset="synthetic", epochs=3,
                         out=str(tmp_path / "out"), teacher=str(tmp_path / "gone"))
    assert recipe_record(config)["teacher"] == {
        "path": str(tmp_path / "gone"), "manifest_sha256": None, "name": None,
        "version": None, "accuracy": None, "accuracy_runtime": None}


def test_manifests_from_before_the_recipe_still_load() -> None:
    # The manifest of models/fashion_mnist_optimized as shipped from 2026-11-24 to 2026-12-02.
    old = json.loads((Path(__file__).with_name("manifest_before_recipe.json")).read_text())
    assert "recipe" not in old["training"]
    assert ArtifactManifest.model_validate(old).training.recipe is None
