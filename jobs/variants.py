"""One Keras model, every way to ship it: the in-process training and the exports that
``framecast bench model`` and ``framecast sweep`` compare.

Training here is plain Keras in this process (no Ray Train): a sweep trains the same model
five times on one machine, and the Ray Train path (``framecast train``) adds workers and
checkpointing, not different weights. Pruning, QAT and the LiteRT conversions are the ones
``framecast train`` uses (jobs.pruning, jobs.qat, jobs.export).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.exceptions import OptionError
from serving.exceptions import ArtifactError

# Sweep sparsity labels -> (prune schedule, target sparsity).
SPARSITY_SCHEDULES: dict[str, tuple[str, float]] = {
    "0": ("none", 0.0),
    "0.5": ("polynomial", 0.5),
    "0.75": ("polynomial", 0.75),
    "0.9": ("polynomial", 0.9),
    "2:4": ("2:4", 0.5),
}
# bench model's exports, in the order the report lists them.
EXPORTS = ("keras", "saved_model", "litert-float32", "litert-float16", "litert-dynamic",
           "litert-int8", "onnxruntime")
ONNX_OPSET = 17


@dataclass
class TrainedModel:
    """A trained (pruning-stripped) Keras model and how it was trained."""

    model: Any
    prune: str
    target_sparsity: float
    measured_sparsity: float
    pruned_layers: list[str]
    m_by_n: bool
    seconds: float
    history: list[dict[str, float]]


def train_in_process(model_name: str, x_train: np.ndarray, y_train: np.ndarray,
                     num_classes: int, *, epochs: int, sparsity: str = "0",
                     batch_size: int = 128, learning_rate: float = 2e-3,
                     seed: int = 0) -> TrainedModel:
    """Train model_name for epochs on uint8 images with the sweep's pruning label applied."""
    from jobs.data import make_tf_dataset
    from jobs.models import ModelSpec, build_model
    from jobs.pruning import (
        apply_pruning,
        is_m_by_n,
        measure_sparsity,
        plan_pruning,
        pruned_layer_names,
        pruning_callbacks,
        strip,
    )
    from jobs.tf_env import keras

    if sparsity not in SPARSITY_SCHEDULES:
        raise OptionError(f"unknown sparsity {sparsity!r}; expected one of: "
                         f"{', '.join(SPARSITY_SCHEDULES)}")
    schedule, target = SPARSITY_SCHEDULES[sparsity]
    keras.utils.set_random_seed(seed)
    steps = max(1, -(-len(y_train) // batch_size))
    plan = plan_pruning(schedule, target, steps, epochs)
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    model = apply_pruning(build_model(ModelSpec(model_name), input_shape,  # type: ignore[arg-type]
                                      num_classes), plan)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=steps * epochs, alpha=0.02)),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    data = make_tf_dataset(x_train, y_train, batch_size, training=True, seed=seed)
    started = time.perf_counter()
    history = model.fit(data, epochs=epochs, verbose=0, callbacks=pruning_callbacks(plan))
    seconds = time.perf_counter() - started
    layers = pruned_layer_names(model) if plan.enabled else []
    stripped = strip(model) if plan.enabled else model
    measured, _ = measure_sparsity(stripped, layers)
    rows = [{key: float(values[i]) for key, values in history.history.items()}
            for i in range(len(history.history.get("loss", [])))]
    return TrainedModel(stripped, schedule, plan.effective_target, measured, layers,
                        bool(layers) and schedule == "2:4" and is_m_by_n(stripped, layers),
                        seconds, rows)


def restore_from_artifact(directory: Path) -> tuple[Any, Any]:
    """(Keras model with the artifact's float weights, its manifest), from saved_model/.

    The SavedModel's object graph holds the Keras model under ``model`` (jobs.export), so a
    tf.train.Checkpoint with the same structure reads its variables straight back.
    """
    from jobs.models import ModelSpec, build_model
    from jobs.tf_env import tf
    from serving.artifacts import load_artifact

    artifact = load_artifact(directory)
    manifest = artifact.manifest
    if artifact.saved_model_path is None:
        raise ArtifactError(f"{directory}: has no saved_model/ to take the float weights from")
    shape = tuple(int(d) for d in manifest.input.shape[1:])
    model = build_model(ModelSpec(manifest.model), shape,  # type: ignore[arg-type]
                        len(manifest.classes))
    status = tf.train.Checkpoint(model=model).read(
        str(artifact.saved_model_path / "variables" / "variables"))
    status.assert_existing_objects_matched()
    return model, manifest


def convert_litert_float32(model: Any) -> bytes:
    """A float32 LiteRT flatbuffer (no optimizations), same signature as the other modes."""
    from jobs.export import _concrete_function
    from jobs.tf_env import tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([_concrete_function(model)],
                                                                model)
    return bytes(converter.convert())


def convert_litert(model: Any, mode: str, calibration: np.ndarray) -> bytes:
    """LiteRT flatbuffer for mode: float32 | float16 | dynamic | int8."""
    from jobs.export import convert_tflite

    if mode == "float32":
        return convert_litert_float32(model)
    return convert_tflite(model, mode, calibration)


def convert_onnx(model: Any) -> bytes:
    """The model as ONNX (tf2onnx, opset 17), input ``images`` [N, H, W, C] float32."""
    import tf2onnx

    from jobs.tf_env import tf

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="images"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET)
    return bytes(proto.SerializeToString())


class OnnxRunner:
    """ONNX Runtime (CPU execution provider) on uint8 images, as jobs.evaluate's runners."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, num_threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads sleep instead of spinning: on a shared 2-core machine spinning
        # threads steal the cores the working ones need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for uint8 images [N, H, W, C]."""
        from jobs.data import normalize

        return np.asarray(self._session.run(None, {self._input: normalize(images)})[0])


class KerasRunner:
    """Plain Keras ``model.predict`` - what a user who exports nothing would run."""

    runtime = "keras"

    def __init__(self, model: Any) -> None:
        self._model = model

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for uint8 images [N, H, W, C]."""
        from jobs.data import normalize

        return np.asarray(self._model.predict(normalize(images), batch_size=len(images),
                                              verbose=0))


def directory_bytes(path: Path) -> bytes:
    """A file's bytes, or a directory's files' bytes concatenated in path order."""
    if path.is_file():
        return path.read_bytes()
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())
