"""Quantization-aware training (tfmot): a short fine-tune of the trained model with fake-quant.

The trained (and, if pruned, stripped) float model is annotated for 8-bit quantization and
fine-tuned for a few epochs at a low learning rate, so that the int8 LiteRT export starts
from weights that already expect int8 rounding. When the model was pruned, tfmot's
pruning-preserving scheme (PQAT) keeps the zeros in place: the sparsity survives QAT.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jobs.exceptions import OptionError
from jobs.tf_env import keras

QAT_LEARNING_RATE_FACTOR = 0.1  # of the main run's initial learning rate


def quantization_aware(model: keras.Model, *, preserve_sparsity: bool) -> keras.Model:
    """The model wrapped for quantization-aware training (weights copied, not retrained).

    Raises ValueError naming the model when tfmot cannot quantize one of its layers.
    """
    import tensorflow_model_optimization as tfmot

    quantization = tfmot.quantization.keras
    try:
        annotated = quantization.quantize_annotate_model(model)
        with quantization.quantize_scope():
            if preserve_sparsity:
                scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
                return quantization.quantize_apply(annotated, scheme)
            return quantization.quantize_apply(annotated)
    except (ValueError, RuntimeError, TypeError) as error:
        raise OptionError(
            f"--qat: tfmot cannot make {model.name} quantization-aware: {error}"
        ) from None


def finetune_quantization_aware(
    model: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    preserve_sparsity: bool,
    seed: int,
) -> tuple[keras.Model, list[dict[str, Any]]]:
    """(QAT model fine-tuned for ``epochs`` on the uint8 training images, per-epoch history)."""
    from jobs.data import make_tf_dataset

    if epochs < 1:
        raise OptionError(f"qat epochs must be >= 1, got {epochs}")
    keras.utils.set_random_seed(seed)
    qat_model = quantization_aware(model, preserve_sparsity=preserve_sparsity)
    qat_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate * QAT_LEARNING_RATE_FACTOR),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    data = make_tf_dataset(x_train, y_train, batch_size, training=True, seed=seed)
    history = qat_model.fit(data, epochs=epochs, verbose=0)
    rows = [
        {key: float(values[index]) for key, values in history.history.items()}
        | {"epoch": float(index + 1)}
        for index in range(epochs)
    ]
    return qat_model, rows
