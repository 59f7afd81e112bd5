"""Export: the float SavedModel, and LiteRT models (int8 full-integer, float16, dynamic range)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jobs.data import normalize
from jobs.names import QUANTIZE_MODES, validate_choice
from jobs.tf_env import keras, tf

SERVING_SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


def save_float_saved_model(model: keras.Model, directory: Path) -> None:
    """Write a float32 SavedModel with one signature: images [N,H,W,C] -> probabilities."""
    shape = [None, *model.input_shape[1:]]

    class Exported(tf.Module):
        def __init__(self, inner: keras.Model) -> None:
            super().__init__()
            self.model = inner

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
        def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            return {OUTPUT_NAME: self.model(images, training=False)}

    module = Exported(model)
    tf.saved_model.save(module, str(directory),
                        signatures={SERVING_SIGNATURE: module.serve})


def _concrete_function(model: keras.Model) -> tf.types.experimental.ConcreteFunction:
    shape = [1, *model.input_shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: model(images, training=False)}

    return serve.get_concrete_function()


def convert_tflite(model: keras.Model, mode: str,
                   calibration_images: np.ndarray | None = None) -> bytes:
    """Convert to a LiteRT flatbuffer; int8 needs uint8 calibration images (NHWC)."""
    validate_choice("quantization", mode, QUANTIZE_MODES)
    if mode == "none":
        raise ValueError("quantization 'none' writes no LiteRT model")
    function = _concrete_function(model)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if calibration_images is None or len(calibration_images) == 0:
            raise ValueError("int8 quantization needs a non-empty calibration set")
        floats = normalize(calibration_images)

        def representative() -> Iterator[list[np.ndarray]]:
            for index in range(len(floats)):
                yield [floats[index:index + 1]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())
