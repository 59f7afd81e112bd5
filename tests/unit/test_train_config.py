"""TrainConfig is the one list of training settings; `framecast train` flags are mapped onto it."""

from __future__ import annotations

from typing import Any

import pytest
import typer.main
from pydantic import ValidationError

from cluster.cli import TRAIN_FLAGS, app
from cluster.config_flags import ConfigFlags
from cluster.exceptions import SettingsError
from jobs.config import TrainConfig
from jobs.names import MODEL_NAMES, PRUNE_SCHEDULES, QUANTIZE_MODES

REQUIRED = {"model": "optimized_cnn", "dataset": "synthetic", "epochs": "1", "out": "/tmp/a"}


def _train_command() -> Any:
    return typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in TrainConfig.model_fields.items() if not field.description]
    assert not missing


def test_every_flag_is_a_field_and_defaults_to_unset() -> None:
    options = {p.name: p for p in _train_command().params if p.name != "help"}
    assert set(options) == set(TRAIN_FLAGS.fields)
    assert set(TrainConfig.model_fields) - set(options) == {
        "storage_path", "run_name"}
    for name, option in options.items():
        assert option.default is None, name  # the model's default applies, not the flag's
        assert option.required == TrainConfig.model_fields[name].is_required(), name


def test_the_zoo_and_the_choices_come_from_the_literals() -> None:
    assert MODEL_NAMES == ("baseline_cnn", "mobilenet_v2", "optimized_cnn", "stream_cnn",
                           "camera_cnn", "stream_sep", "stream_dw", "stream_fc", "stream_deep",
                           "optimized_fc", "optimized_fc128")
    assert PRUNE_SCHEDULES == ("none", "polynomial", "constant", "2:4")
    assert QUANTIZE_MODES == ("none", "int8", "float16", "dynamic")
    options = {p.name: p for p in _train_command().params}
    assert options["prune"].metavar == "[none|polynomial|constant|2:4]"
    assert options["epochs"].metavar == "<int> [x>0]"
    assert options["val_fraction"].metavar == "<float> [0.0<x<0.5]"
    assert options["augment"].secondary_opts == ["--no-augment"]
    assert options["qat"].opts == ["--qat"] and not options["qat"].secondary_opts


def test_unset_flags_take_the_models_defaults() -> None:
    config = TRAIN_FLAGS.validate(REQUIRED)
    assert config == TrainConfig(model="optimized_cnn", dataset="synthetic", epochs=1,
                                 out="/tmp/a")
    assert (config.quantize, config.prune, config.target_sparsity) == ("int8", "none", None)
    assert config.workers == 1 and config.augment is True


@pytest.mark.parametrize(
    ("flags", "field", "message"),
    [
        ({"prune": "cubic"}, "train.prune",
         "Input should be 'none', 'polynomial', 'constant' or '2:4' (got 'cubic')"),
        ({"quantize": "int4"}, "train.quantize", "Input should be 'none', 'int8'"),
        ({"epochs": "0"}, "train.epochs", "Input should be greater than 0"),
        ({"lr_schedule": "step"}, "train.lr_schedule", "Input should be 'cosine' or 'exponential'"),
        ({"qat": True, "quantize": "dynamic"}, "train.qat", "--qat needs --quantize int8"),
        ({"prune": "2:4", "target_sparsity": "0.5"}, "train.target_sparsity",
         "2:4 always prunes half the weights"),
        ({"prune": "polynomial", "target_sparsity": "1"}, "train.target_sparsity",
         "--target-sparsity must be in (0, 1)"),
        ({"val_fraction": "0.5"}, "train.val_fraction", "Input should be less than 0.5"),
        ({"input_size": "8"}, "train.input_size", "Input should be greater than or equal to 16"),
        ({"label_smoothing": "1"}, "train.label_smoothing", "Input should be less than 1"),
        ({"mixup": "-0.2"}, "train.mixup", "Input should be greater than or equal to 0"),
        ({"random_erasing": "1.5"}, "train.random_erasing", "less than or equal to 1"),
        ({"warmup_epochs": "1"}, "train.warmup_epochs",
         "--warmup-epochs (1) must be < --epochs (1)"),
        ({"ema": "1"}, "train.ema", "Input should be less than 1"),
        ({"distill_alpha": "0.3"}, "train.distill_alpha", "--distill-alpha needs --teacher"),
        ({"distill_temperature": "2"}, "train.distill_temperature",
         "--distill-temperature needs --teacher"),
        ({"teacher": "t", "distill_temperature": "0"}, "train.distill_temperature",
         "Input should be greater than 0"),
    ],
)
def test_a_refused_flag_is_named_as_its_field(flags: dict[str, Any], field: str,
                                              message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        TRAIN_FLAGS.validate({**REQUIRED, **flags})
    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"{field}: "), first
    assert message in first


def test_a_pruning_schedule_with_a_target_gets_the_default_target() -> None:
    assert TRAIN_FLAGS.validate({**REQUIRED, "prune": "constant"}).target_sparsity == 0.5
    assert TRAIN_FLAGS.validate({**REQUIRED, "prune": "2:4"}).target_sparsity is None


def test_a_teacher_gets_the_default_distillation_settings() -> None:
    config = TRAIN_FLAGS.validate({**REQUIRED, "teacher": "models/big"})
    assert (config.distill_alpha, config.distill_temperature) == (0.5, 4.0)
    plain = TRAIN_FLAGS.validate(REQUIRED)
    assert (plain.distill_alpha, plain.distill_temperature) == (None, None)
    assert (plain.label_smoothing, plain.mixup, plain.cutmix, plain.random_erasing,
            plain.warmup_epochs, plain.ema) == (0.0, 0.0, 0.0, 0.0, 0, 0.0)
    recipe = TRAIN_FLAGS.validate({**REQUIRED, "epochs": "4", "teacher": "t", "ema": "0.99",
                                   "distill_alpha": "0.7", "warmup_epochs": "1"})
    assert TrainConfig.model_validate(recipe.model_dump()) == recipe


@pytest.mark.parametrize("prune", PRUNE_SCHEDULES)
def test_the_config_survives_the_trip_to_the_workers(prune: str) -> None:
    # run_ray_training sends model_dump() to every worker, which validates it again.
    config = TRAIN_FLAGS.validate({**REQUIRED, "prune": prune, "qat": True})
    assert TrainConfig.model_validate(config.model_dump()) == config


def test_submit_train_passes_on_the_flags_that_were_set() -> None:
    given = TRAIN_FLAGS.given({**REQUIRED, "qat": True, "augment": False, "limit": None,
                               "prune": "polynomial", "target_sparsity": "0.75"})
    args = TRAIN_FLAGS.to_args(given)
    assert args == ["--model", "optimized_cnn", "--dataset", "synthetic", "--epochs", "1",
                    "--out", "/tmp/a", "--prune", "polynomial", "--target-sparsity", "0.75",
                    "--qat", "--no-augment"]
    # The job's `framecast train` parses them back into the same config.
    context = _train_command().make_context("train", list(args))
    assert TRAIN_FLAGS.validate(TRAIN_FLAGS.given(context.params)) == TRAIN_FLAGS.validate(given)


def test_flags_of_any_model() -> None:
    from pydantic import BaseModel, Field

    class Knobs(BaseModel):
        speed: int = Field(default=3, ge=1, le=9, description="How fast.")

    flags = ConfigFlags(Knobs, "knobs")
    assert flags.validate({}).speed == 3
    with pytest.raises(SettingsError, match=r"^knobs.speed: Input should be less than or equal"):
        flags.validate({"speed": "10"})
    with pytest.raises(ValidationError):
        Knobs(speed=0)
