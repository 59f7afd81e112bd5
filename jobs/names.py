"""Names of the models, pruning schedules and quantization modes (no TensorFlow import)."""

from __future__ import annotations

from jobs.exceptions import OptionError

MODEL_NAMES = ("baseline_cnn", "mobilenet_v2", "optimized_cnn", "stream_cnn")
PRUNE_SCHEDULES = ("none", "polynomial", "constant", "2:4")
QUANTIZE_MODES = ("none", "int8", "float16", "dynamic")


def validate_prune_options(schedule: str, target_sparsity: float) -> None:
    """Raise OptionError naming the constraint when the pruning options are not usable."""
    if schedule not in PRUNE_SCHEDULES:
        raise OptionError(f"unknown prune schedule {schedule!r}; expected one of: "
                         f"{', '.join(PRUNE_SCHEDULES)}")
    if schedule in ("polynomial", "constant") and not 0.0 < target_sparsity < 1.0:
        raise OptionError(f"--target-sparsity must be in (0, 1) for --prune {schedule}, "
                         f"got {target_sparsity}")


def validate_quantize(mode: str) -> None:
    """Raise OptionError unless mode is a known quantization mode."""
    if mode not in QUANTIZE_MODES:
        raise OptionError(f"unknown quantization {mode!r}; expected one of: "
                         f"{', '.join(QUANTIZE_MODES)}")
