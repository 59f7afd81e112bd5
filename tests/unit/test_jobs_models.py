"""Models for RGB camera frames: camera_cnn and mobilenet_v2 at 224x224x3, camera_cnn pruned,
quantization-aware and int8, and mobilenet_v2 fine-tuned from a local ImageNet-style
checkpoint (no downloads). Training here is tiny (32x32 RGB, a few hundred images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.data import make_tf_dataset, normalize, synthetic_images
from jobs.exceptions import OptionError
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

SIZE, EPOCHS, BATCH = 32, 2, 32


def _rgb(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = synthetic_images(count, seed=seed, size=SIZE)
    tint = np.array([1.0, 0.7, 0.4], dtype=np.float32)
    return (images * tint).astype(np.uint8), labels


def test_camera_models_build_at_224_rgb() -> None:
    camera = build_model(ModelSpec("camera_cnn"), (224, 224, 3), 10)
    mobilenet = build_model(ModelSpec("mobilenet_v2", alpha=1.0), (224, 224, 3), 10)
    baseline = build_model(ModelSpec("baseline_cnn"), (224, 224, 3), 10)
    for model in (camera, mobilenet, baseline):
        assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 10)
    assert "resize" not in [layer.name for layer in mobilenet.layers]  # 224 needs none
    # The stride-4 stem and inverted residuals: a fifth of MobileNetV2 1.0's work at 224.
    assert count_macs(camera) * 4 < count_macs(mobilenet)
    assert camera.count_params() < 400_000


@pytest.fixture(scope="module")
def pruned_camera() -> tuple[Any, list[str], tuple[np.ndarray, np.ndarray]]:
    keras.utils.set_random_seed(0)
    x, y = _rgb(320, seed=0)
    steps = -(-len(y) // BATCH)
    plan = plan_pruning("polynomial", 0.5, steps, EPOCHS)
    model = apply_pruning(build_model(ModelSpec("camera_cnn"), (SIZE, SIZE, 3), 10), plan)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(make_tf_dataset(x, y, BATCH, training=True, seed=0), epochs=EPOCHS,
              callbacks=pruning_callbacks(plan), verbose=0)
    return strip(model), pruned_layer_names(model), (x, y)


def _int8_agreement(model: Any, tflite: bytes, images: np.ndarray) -> float:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite, num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    floats = normalize(images)
    expected = model.predict(floats, verbose=0).argmax(axis=1)
    scale, zero = inp["quantization"]
    agree = 0
    for image, label in zip(floats, expected, strict=True):
        interpreter.set_tensor(
            inp["index"], np.clip(np.round(image / scale + zero), -128, 127).astype(np.int8)[None])
        interpreter.invoke()
        agree += int(interpreter.get_tensor(out["index"])[0].argmax() == label)
    return agree / len(images)


def test_camera_cnn_prunes_and_exports_int8(pruned_camera: Any) -> None:
    model, layers, (x, _) = pruned_camera
    # stem, 6 x (expand + project), head conv, classifier; depthwise kernels are not pruned
    assert len(layers) == 15
    measured, _ = measure_sparsity(model, layers)
    assert abs(measured - 0.5) <= 0.02, measured
    assert _int8_agreement(model, convert_tflite(model, "int8", x[:64]), x[:60]) >= 0.8


def test_camera_cnn_is_quantization_aware(pruned_camera: Any) -> None:
    # tfmot can wrap every layer (the fine-tune itself is test_jobs_pruning's, on optimized_cnn).
    from jobs.qat import quantization_aware

    model, _, _ = pruned_camera
    qat_model = quantization_aware(model, preserve_sparsity=True)
    wrapped = [layer for layer in qat_model.layers if "quant" in layer.name]
    assert len(wrapped) >= 15
    assert qat_model.output_shape == (None, 10)


def test_mobilenet_fine_tunes_from_an_imagenet_style_backbone_file(tmp_path: Path) -> None:
    # What keras.applications publishes (mobilenet_v2_weights_..._no_top.h5), made here with
    # random weights: no download.
    backbone = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=0.35,
                                              include_top=False, weights=None)
    path = tmp_path / "mobilenet_v2_weights_0.35_no_top.h5"
    backbone.save_weights(str(path))
    expected = backbone.get_layer("Conv1").kernel.numpy()
    for size in (SIZE, 64):  # convolutions do not depend on the input size
        model = build_model(ModelSpec("mobilenet_v2", alpha=0.35, weights=str(path)),
                            (size, size, 3), 10)
        np.testing.assert_array_equal(model.get_layer("Conv1").kernel.numpy(), expected)
        assert model.output_shape == (None, 10)
    with pytest.raises(OptionError, match=r"--weights .* fits neither mobilenet_v2 alpha 0\.5"):
        build_model(ModelSpec("mobilenet_v2", alpha=0.5, weights=str(path)), (SIZE, SIZE, 3), 10)


def test_camera_augmentation_changes_colours_and_keeps_the_range() -> None:
    from jobs.data import CAMERA_AUGMENTATION

    x, y = _rgb(64, seed=1)
    batch = next(iter(make_tf_dataset(x, y, 64, training=True, seed=0,
                                      aug=CAMERA_AUGMENTATION)))[0].numpy()
    assert batch.shape == (64, SIZE, SIZE, 3)
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    # The source images are tinted (R > G > B); channel orders and grey break that rule.
    means = batch.mean(axis=(1, 2))
    assert np.mean((means[:, 0] > means[:, 1]) & (means[:, 1] > means[:, 2])) < 0.6
