"""Names of the models, datasets, pruning schedules and quantization modes (no TensorFlow import).

Each set of choices is one ``Literal`` type; the tuples are read from it. ``TrainConfig``
(jobs/config.py) validates its fields with these types; the ``_validate_*``-style helpers here
are for the library functions that callers may reach without a ``TrainConfig`` (the sweep,
the benchmarks), and for the constraints that join two options.
"""

from __future__ import annotations

from typing import Literal, get_args

from jobs.exceptions import DatasetError, OptionError

ModelName = Literal["baseline_cnn", "mobilenet_v2", "optimized_cnn", "stream_cnn", "camera_cnn",
                    "stream_sep", "stream_dw", "stream_fc", "stream_deep", "optimized_fc",
                    "optimized_fc128"]
PruneSchedule = Literal["none", "polynomial", "constant", "2:4"]
QuantizeMode = Literal["none", "int8", "float16", "dynamic"]
LrSchedule = Literal["cosine", "exponential"]
AugmentPolicy = Literal["standard", "light"]

MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)
PRUNE_SCHEDULES: tuple[PruneSchedule, ...] = get_args(PruneSchedule)
QUANTIZE_MODES: tuple[QuantizeMode, ...] = get_args(QuantizeMode)
# The schedules that take a target sparsity (2:4 always prunes 2 of every 4 weights).
TARGETED_SCHEDULES: tuple[PruneSchedule, ...] = ("polynomial", "constant")
DEFAULT_TARGET_SPARSITY = 0.5
DATASETS = ("fashion-mnist", "scenes", "scenes:heldout", "folder:PATH", "synthetic")


def validate_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise OptionError naming what unless value is one of choices."""
    if value not in choices:
        raise OptionError(f"unknown {what} {value!r}; expected one of: {', '.join(choices)}")


def validate_target_sparsity(schedule: str, target_sparsity: float | None) -> None:
    """Raise OptionError unless a polynomial or constant schedule has a target in (0, 1).

    (none and 2:4 ignore the target; TrainConfig refuses one given with them.)
    """
    if schedule in TARGETED_SCHEDULES and (
            target_sparsity is None or not 0.0 < target_sparsity < 1.0):
        raise OptionError(f"--target-sparsity must be in (0, 1) for --prune {schedule}, "
                          f"got {target_sparsity}")


def validate_prune_options(schedule: str, target_sparsity: float | None) -> None:
    """Raise OptionError naming the constraint when the pruning options are not usable."""
    validate_choice("prune schedule", schedule, PRUNE_SCHEDULES)
    validate_target_sparsity(schedule, target_sparsity)


def validate_dataset_name(name: str) -> None:
    """Raise DatasetError unless name is fashion-mnist, scenes[:heldout], synthetic or
    folder:PATH."""
    if name in ("fashion-mnist", "scenes", "scenes:heldout", "synthetic"):
        return
    if name.startswith("folder:") and len(name) > len("folder:"):
        return
    raise DatasetError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
