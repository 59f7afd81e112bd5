"""Pruning reaches its target and survives strip + int8 export; int8 agrees with float."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jobs.data import load_dataset, make_tf_dataset, normalize
from jobs.export import convert_tflite
from jobs.models import ModelSpec, build_model
from jobs.pruning import (
    apply_pruning,
    check_sparsity,
    is_m_by_n,
    measure_sparsity,
    plan_pruning,
    pruned_layer_names,
    pruning_callbacks,
    strip,
)
from jobs.tf_env import keras

EPOCHS, BATCH = 4, 32


def _train_pruned(schedule: str, target: float) -> tuple[Any, Any, list[str], Any]:
    keras.utils.set_random_seed(0)
    data = load_dataset("synthetic", limit=480, test_limit=120, seed=0)
    steps = -(-len(data.y_train) // BATCH)
    plan = plan_pruning(schedule, target, steps, EPOCHS)
    model = apply_pruning(build_model(ModelSpec("optimized_cnn"), data.input_shape, 10), plan)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        make_tf_dataset(data.x_train, data.y_train, BATCH, training=True, seed=0),
        epochs=EPOCHS,
        callbacks=pruning_callbacks(plan),
        verbose=0,
    )
    layers = pruned_layer_names(model)
    return strip(model), plan, layers, data


@pytest.fixture(scope="module")
def polynomial() -> tuple[Any, Any, list[str], Any]:
    return _train_pruned("polynomial", 0.6)


def test_polynomial_reaches_target_within_two_points(polynomial: Any) -> None:
    model, plan, layers, _ = polynomial
    assert len(layers) == 6  # 5 convs + the classifier
    measured, per_layer = measure_sparsity(model, layers)
    assert abs(measured - 0.6) <= 0.02
    assert all(abs(value - 0.6) <= 0.02 for value in per_layer.values())
    check_sparsity(measured, plan)
    with pytest.raises(ValueError, match=r"not within 0\.02 of the target"):
        check_sparsity(0.3, plan)


def test_int8_export_keeps_sparsity_has_int8_io_and_agrees_with_float(polynomial: Any) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from jobs.evaluate import LiteRTRunner

    model, _, _, data = polynomial
    flatbuffer = convert_tflite(model, "int8", data.x_train[:100])
    interpreter = Interpreter(model_content=flatbuffer)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    scale, zero_point = interpreter.get_input_details()[0]["quantization"]
    # Calibration images span [0, max]: the int8 input maps 0 to -128, max to 127.
    assert scale == pytest.approx(data.x_train[:100].max() / 255 / 255, rel=0.02)
    assert zero_point == -128

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(flatbuffer)
        int8_pred = LiteRTRunner(path).predict(data.x_test).argmax(axis=1)
    float_pred = model.predict(normalize(data.x_test), verbose=0).argmax(axis=1)
    agreement = float(np.mean(int8_pred == float_pred))
    assert agreement >= 0.9, f"int8 agrees with float on only {agreement:.2%}"
    # Stripped weights stay zero in the float model that was exported.
    kernel = model.get_layer("conv4").kernel.numpy()
    assert np.mean(kernel == 0) == pytest.approx(0.6, abs=0.02)


def test_two_four_pruning_is_structured() -> None:
    model, plan, layers, _ = _train_pruned("2:4", 0.0)
    assert "conv1" not in layers  # 1 input channel: 2:4 not applicable
    measured, _ = measure_sparsity(model, layers)
    assert abs(measured - 0.5) <= 0.02
    assert plan.effective_target == 0.5
    assert is_m_by_n(model, layers)


def test_bad_pruning_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown prune schedule 'cubic'"):
        plan_pruning("cubic", 0.5, 10, 2)
    with pytest.raises(ValueError, match=r"--target-sparsity must be in \(0, 1\)"):
        plan_pruning("constant", 0.0, 10, 2)


@pytest.mark.parametrize("mode", ["float16", "dynamic"])
def test_float16_and_dynamic_exports_run_and_agree(
    polynomial: Any, mode: str, tmp_path: Any
) -> None:
    from jobs.evaluate import LiteRTRunner

    model, _, _, data = polynomial
    path = tmp_path / "model.tflite"
    path.write_bytes(convert_tflite(model, mode))
    runner = LiteRTRunner(path)
    assert runner.input_dtype == np.float32
    lite = runner.predict(data.x_test).argmax(axis=1)
    reference = model.predict(normalize(data.x_test), verbose=0).argmax(axis=1)
    assert float(np.mean(lite == reference)) >= 0.9


def test_pruning_preserving_qat_keeps_sparsity_and_exports_int8(polynomial: Any) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from jobs.qat import finetune_quantization_aware

    model, _, _, data = polynomial
    qat_model, history = finetune_quantization_aware(
        model,
        data.x_train,
        data.y_train,
        epochs=1,
        batch_size=BATCH,
        learning_rate=3e-3,
        preserve_sparsity=True,
        seed=0,
    )
    assert len(history) == 1 and "accuracy" in history[0]
    assert any("quant" in layer.name for layer in qat_model.layers)  # fake-quant wrappers
    kernels = [w.numpy() for w in qat_model.weights if w.name.endswith("kernel:0")]
    assert len(kernels) == 6
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    assert abs(zeros - 0.6) <= 0.02, zeros  # PQAT kept the pruned zeros
    interpreter = Interpreter(
        model_content=convert_tflite(qat_model, "int8", data.x_train[:64]), num_threads=1
    )
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    images = normalize(data.x_test[:60])
    float_labels = model.predict(images, verbose=0).argmax(axis=1)
    scale, zero = inp["quantization"]
    agree = 0
    for image, expected in zip(images, float_labels, strict=True):
        q = np.clip(np.round(image / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q[None])
        interpreter.invoke()
        agree += int(interpreter.get_tensor(out["index"])[0].argmax() == expected)
    assert agree / len(images) >= 0.8, agree


def test_qat_refuses_a_model_tfmot_cannot_quantize() -> None:
    from jobs.qat import quantization_aware

    inputs = keras.Input(shape=(8, 8, 1))
    outputs = keras.layers.Resizing(16, 16)(inputs)  # as in mobilenet_v2 on 28x28 frames
    with pytest.raises(ValueError, match=r"cannot make odd quantization-aware"):
        quantization_aware(keras.Model(inputs, outputs, name="odd"), preserve_sparsity=False)
