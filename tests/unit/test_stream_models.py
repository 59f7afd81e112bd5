"""The Fashion-MNIST architectures of issue 22 - the stream candidates (stream_fc, stream_deep;
the separable stream_sep and stream_dw), <= 2 M MACs, and optimized_fc and optimized_fc128,
<= 20 M: 28x28x1 in, only layers tfmot prunes and LiteRT runs in int8, pruned and exported
int8 (tiny training on synthetic 28x28 images)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jobs.data import make_tf_dataset, normalize, synthetic_images
from jobs.export import convert_tflite
from jobs.models import ModelSpec, build_model, count_macs
from jobs.pruning import (
    apply_pruning,
    measure_sparsity,
    plan_pruning,
    pruned_layer_names,
    pruning_callbacks,
    strip,
)
from jobs.tf_env import keras

STREAM_MODELS = ("stream_fc", "stream_deep", "stream_sep", "stream_dw")
SEPARABLE = ("stream_sep", "stream_dw")  # depthwise blocks, residual where the shape stays
# Issue 22's budgets: 2 M MACs for the stream model, 20 M for the optimized one; each
# candidate against the model it would replace.
BUDGETS = {**{name: ("stream_cnn", 2_000_000) for name in STREAM_MODELS},
           "optimized_fc": ("optimized_cnn", 20_000_000),
           "optimized_fc128": ("optimized_cnn", 20_000_000)}
# Everything LiteRT runs in int8 (BatchNorm folds into the convs, Flatten is a reshape,
# Dropout is gone at inference).
INT8_LAYERS = (keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
               keras.layers.Dense, keras.layers.BatchNormalization, keras.layers.ReLU,
               keras.layers.MaxPooling2D, keras.layers.Add, keras.layers.Flatten,
               keras.layers.Dropout)
EPOCHS, BATCH = 2, 32


@pytest.mark.parametrize("name", BUDGETS)
def test_a_candidate_builds_at_28x28x1_within_its_budget(name: str) -> None:
    model = build_model(ModelSpec(name), (28, 28, 1), 10)
    assert model.name == name
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    reference, budget = BUDGETS[name]
    shipped = count_macs(build_model(ModelSpec(reference), (28, 28, 1), 10))
    # The budget, and not much less than the shipped model's: the MACs are spent, not saved.
    assert 0.85 * shipped < count_macs(model) <= budget
    for layer in model.layers:
        assert isinstance(layer, INT8_LAYERS), layer
    # stream_fc and stream_deep have none: in XNNPACK int8 a depthwise MAC costs about twice
    # a full conv's.
    kinds = {type(layer) for layer in model.layers}
    assert (keras.layers.DepthwiseConv2D in kinds) == (name in SEPARABLE)
    assert (keras.layers.Add in kinds) == (name in SEPARABLE)
    # The flat head keeps where a feature sits: the last map is 7x7.
    assert model.get_layer("flatten").input_shape[1:3] == (7, 7)


@pytest.fixture(scope="module", params=list(BUDGETS))
def pruned_stream(request: Any) -> tuple[Any, list[str], np.ndarray]:
    keras.utils.set_random_seed(0)
    x, y = synthetic_images(320, seed=0)
    plan = plan_pruning("polynomial", 0.5, -(-len(y) // BATCH), EPOCHS)
    model = apply_pruning(build_model(ModelSpec(request.param), (28, 28, 1), 10), plan)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(make_tf_dataset(x, y, BATCH, training=True, seed=0), epochs=EPOCHS,
              callbacks=pruning_callbacks(plan), verbose=0)
    return strip(model), pruned_layer_names(model), x


def test_a_stream_model_prunes_to_the_target_and_exports_int8(pruned_stream: Any) -> None:
    from ai_edge_litert.interpreter import Interpreter

    model, layers, x = pruned_stream
    # every Conv2D and Dense layer, the stem included; depthwise kernels are not pruned
    weighted = [layer for layer in model.layers
                if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)
                and not isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert len(layers) == len(weighted) >= 4
    measured, _ = measure_sparsity(model, layers)
    assert abs(measured - 0.5) <= 0.02, measured
    interpreter = Interpreter(model_content=convert_tflite(model, "int8", x[:64]), num_threads=1)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    interpreter.resize_tensor_input(inp["index"], [60, 28, 28, 1])
    interpreter.allocate_tensors()
    scale, zero = inp["quantization"]
    floats = normalize(x[:60])
    interpreter.set_tensor(inp["index"],
                           np.clip(np.round(floats / scale + zero), -128, 127).astype(np.int8))
    interpreter.invoke()
    int8 = interpreter.get_tensor(out["index"]).argmax(axis=1)
    expected = model.predict(floats, verbose=0).argmax(axis=1)
    assert float(np.mean(int8 == expected)) >= 0.9
