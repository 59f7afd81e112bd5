"""Magnitude pruning with tfmot: polynomial, constant and 2:4 (m-by-n) schedules, and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude,
)

from jobs.exceptions import OptionError
from jobs.names import validate_prune_options
from jobs.tf_env import keras

M_BY_N = (2, 4)
SPARSITY_TOLERANCE = 0.02


@dataclass(frozen=True)
class PruningPlan:
    """When and how much to prune, in optimizer steps."""

    schedule: str
    target_sparsity: float
    begin_step: int
    end_step: int
    frequency: int

    @property
    def enabled(self) -> bool:
        """Whether any pruning happens."""
        return self.schedule != "none"

    @property
    def effective_target(self) -> float:
        """The sparsity the prunable layers should end with (2:4 is always 0.5)."""
        if self.schedule == "none":
            return 0.0
        return 0.5 if self.schedule == "2:4" else self.target_sparsity


def plan_pruning(schedule: str, target_sparsity: float | None, steps_per_epoch: int,
                 epochs: int) -> PruningPlan:
    """Prune from 1/5 to 3/4 of training (constant and 2:4: from 1/5), then fine-tune.

    target_sparsity is for polynomial and constant; none and 2:4 ignore it.
    """
    validate_prune_options(schedule, target_sparsity)
    total = max(1, steps_per_epoch * epochs)
    begin = int(total * 0.2)
    end = max(begin + 1, int(total * 0.75))
    frequency = max(1, min(100, (end - begin) // 10))
    target = 0.0 if target_sparsity is None else target_sparsity
    return PruningPlan(schedule, target, begin, end, frequency)


def _m_by_n_applicable(layer: Any) -> bool:
    kernel_in = int(layer.kernel.shape[-2]) if isinstance(layer, keras.layers.Conv2D) \
        else int(layer.kernel.shape[0])
    return kernel_in % M_BY_N[1] == 0


def _is_prunable(layer: Any) -> bool:
    return (isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)
            and not isinstance(layer, keras.layers.DepthwiseConv2D))


def apply_pruning(model: keras.Model, plan: PruningPlan) -> keras.Model:
    """Wrap the Conv2D/Dense layers of model in tfmot pruning wrappers per plan."""
    if not plan.enabled:
        return model
    sparsity = tfmot.sparsity.keras
    if plan.schedule == "polynomial":
        schedule: Any = sparsity.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=plan.target_sparsity,
            begin_step=plan.begin_step, end_step=plan.end_step, frequency=plan.frequency)
    else:
        target = 0.5 if plan.schedule == "2:4" else plan.target_sparsity
        schedule = sparsity.ConstantSparsity(target, begin_step=plan.begin_step,
                                             frequency=plan.frequency)
    m_by_n = M_BY_N if plan.schedule == "2:4" else None

    def wrap(layer: Any) -> Any:
        if not _is_prunable(layer):
            return layer
        if m_by_n is not None and not _m_by_n_applicable(layer):
            return layer
        return sparsity.prune_low_magnitude(layer, pruning_schedule=schedule,
                                            sparsity_m_by_n=m_by_n)

    # Build the layers first so kernels exist for the 2:4 applicability check.
    return keras.models.clone_model(model, clone_function=wrap)


def pruning_callbacks(plan: PruningPlan) -> list[Any]:
    """The callbacks pruning needs during fit (UpdatePruningStep)."""
    return [tfmot.sparsity.keras.UpdatePruningStep()] if plan.enabled else []


def strip(model: keras.Model) -> keras.Model:
    """Remove the pruning wrappers, leaving plain layers with the pruned (zero) weights."""
    return tfmot.sparsity.keras.strip_pruning(model)


def pruned_layer_names(model: keras.Model) -> list[str]:
    """Names of the layers that carry a pruning wrapper."""
    return [layer.layer.name for layer in model.layers if isinstance(layer, PruneLowMagnitude)]


def measure_sparsity(model: keras.Model, layer_names: list[str]) -> tuple[float, dict[str, float]]:
    """(overall, per-layer) fraction of exactly-zero kernel weights over the named layers."""
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for name in layer_names:
        kernel = np.asarray(model.get_layer(name).kernel.numpy())
        layer_zeros = int(np.count_nonzero(kernel == 0))
        per_layer[name] = layer_zeros / kernel.size
        zeros += layer_zeros
        total += kernel.size
    return (zeros / total if total else 0.0), per_layer


def check_sparsity(measured: float, plan: PruningPlan,
                   tolerance: float = SPARSITY_TOLERANCE) -> None:
    """Raise OptionError when the measured sparsity is off the plan's target by > tolerance."""
    if not plan.enabled:
        return
    if abs(measured - plan.effective_target) > tolerance:
        raise OptionError(
            f"measured sparsity {measured:.4f} is not within {tolerance:.2f} of the target "
            f"{plan.effective_target:.4f} ({plan.schedule}); pruning did not finish - train "
            "for more steps"
        )


def is_m_by_n(model: keras.Model, layer_names: list[str]) -> bool:
    """Whether every named layer's kernel has at most 2 non-zeros in each 4 input channels."""
    for name in layer_names:
        kernel = np.asarray(model.get_layer(name).kernel.numpy())
        cin_last = np.moveaxis(kernel, -2, -1).reshape(-1, M_BY_N[1])
        if np.any(np.count_nonzero(cin_last, axis=1) > M_BY_N[1] - M_BY_N[0]):
            return False
    return True
