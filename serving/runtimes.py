"""Model runtimes: LiteRT (int8 or float, XNNPACK) on CPU replicas, the SavedModel on GPUs.

Both take float32 [N, H, W, C] in [0, 1] and return float32 class probabilities [N, K].
:func:`select_runtime` loads from the bytes :func:`serving.artifacts.load_artifact` hashed,
never from the artifact directory again (see serving/artifacts.py).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from serving.artifacts import ArtifactError, LoadedArtifact
from serving.preprocess import PixelConverter, batch_input


class ModelRuntime(Protocol):
    """What a replica needs from a model."""

    kind: str
    precision: str  # what the arithmetic runs in: int8, float16 or float32
    input_hwc: tuple[int, int, int]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a float32 [N, H, W, C] batch in [0, 1]."""
        ...

    def predict_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities for uint8 [H, W, C] frames at the model's size (the same as
        ``predict(batch_input(pixels))``)."""
        ...


def _bucket(n: int) -> int:
    """Round a batch size up to a power of two, so few interpreter shapes exist."""
    size = 1
    while size < n:
        size *= 2
    return size


class LiteRTRuntime:
    """A LiteRT model (int8 full-integer or float) run on CPU with XNNPACK."""

    kind = "litert"

    def __init__(self, model: bytes | Path, num_threads: int = 1, max_batch: int = 256) -> None:
        """``model``: the flatbuffer's bytes (as verified), or a path to read them from."""
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter_cls = Interpreter
        self._model = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.num_threads = max(1, num_threads)
        self.max_batch = max_batch
        self._interpreters: dict[int, Any] = {}
        self._lock = threading.Lock()
        probe = self._interpreter(1)
        inp = probe.get_input_details()[0]
        out = probe.get_output_details()[0]
        shape = [int(d) for d in inp["shape"]]
        self.input_hwc = (shape[1], shape[2], shape[3])
        self.input_dtype = np.dtype(inp["dtype"])
        self.output_dtype = np.dtype(out["dtype"])
        self.precision = "int8" if self.input_dtype in (np.int8, np.uint8) else "float32"
        self._in_q = inp["quantization"]
        self._out_q = out["quantization"]
        self.converter = PixelConverter(self.input_dtype, None if self.input_dtype == np.float32
                                        else self._quantize)

    def _interpreter(self, batch: int) -> Any:
        interp = self._interpreters.get(batch)
        if interp is None:
            interp = self._interpreter_cls(model_content=self._model, num_threads=self.num_threads)
            detail = interp.get_input_details()[0]
            if int(detail["shape"][0]) != batch:
                interp.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
            interp.allocate_tensors()
            self._interpreters[batch] = interp
        return interp

    def _quantize(self, batch: np.ndarray) -> np.ndarray:
        if self.input_dtype == np.float32:
            return batch.astype(np.float32)
        scale, zero_point = self._in_q  # Any (from the interpreter's details)
        info = np.iinfo(self.input_dtype)
        q: np.ndarray = np.clip(np.round(batch / scale + zero_point), info.min, info.max)
        quantized: np.ndarray = q.astype(self.input_dtype)
        return quantized

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        if self.output_dtype == np.float32:
            return raw.astype(np.float32)
        scale, zero_point = self._out_q
        probs: np.ndarray = ((raw.astype(np.float32) - zero_point) * scale).astype(np.float32)
        return probs

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a float32 [N, H, W, C] batch in [0, 1]."""
        n = len(batch)
        outputs = []
        for start in range(0, n, self.max_batch):
            chunk = batch[start : start + self.max_batch]
            size = _bucket(len(chunk))
            padded = (
                chunk
                if size == len(chunk)
                else np.concatenate(
                    [chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)]
                )
            )
            outputs.append(self._invoke(self._quantize(padded), len(chunk)))
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)

    def predict_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities for uint8 [H, W, C] frames at the model's size: each frame
        converted straight into its row of the interpreter's input (no float32 batch; the
        same input as ``predict(batch_input(pixels))``: serving.preprocess.PixelConverter)."""
        outputs = []
        for start in range(0, len(pixels), self.max_batch):
            chunk = pixels[start : start + self.max_batch]
            batch = self.converter.batch(chunk, rows=_bucket(len(chunk)))
            outputs.append(self._invoke(batch, len(chunk)))
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)

    def _invoke(self, batch: np.ndarray, rows: int) -> np.ndarray:
        """The first ``rows`` rows of the model's output for an input-dtype batch."""
        with self._lock:  # an interpreter is not thread-safe
            interp = self._interpreter(len(batch))
            interp.set_tensor(interp.get_input_details()[0]["index"], batch)
            interp.invoke()
            raw = interp.get_tensor(interp.get_output_details()[0]["index"])
        return self._dequantize(raw[:rows])


GPU_PRECISIONS = ("float16", "float32")


class SavedModelRuntime:
    """The float TensorFlow SavedModel, for GPU replicas (and CPU, for comparison).

    On a GPU with ``precision="float16"`` TensorFlow's auto mixed precision graph rewrite
    runs the convolutions and matmuls in float16 (tensor cores) while inputs, outputs and
    the softmax stay float32, so callers see the same structures as with LiteRT. On CPU
    float16 would be slower than float32, so the SavedModel runs in float32 there.
    """

    kind = "savedmodel"

    def __init__(self, path: Path, precision: str = "float16") -> None:
        if precision not in GPU_PRECISIONS:
            raise ValueError(f"precision must be one of {GPU_PRECISIONS}, got {precision!r}")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        self._tf = tf
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
        # Process-wide, set before the first graph runs: a replica is its own process.
        tf.config.optimizer.set_experimental_options(
            {"auto_mixed_precision": on_gpu and precision == "float16"}
        )
        self.device = "GPU" if on_gpu else "CPU"
        self.precision = precision if on_gpu else "float32"
        loaded = tf.saved_model.load(str(path))
        self._keepalive = loaded
        self._fn = loaded.signatures["serving_default"]
        spec = self._fn.structured_input_signature[1]
        ((self._input_name, tensor_spec),) = spec.items()
        shape = tensor_spec.shape.as_list()
        self.input_hwc = (int(shape[1]), int(shape[2]), int(shape[3]))
        (self._output_name,) = self._fn.structured_outputs.keys()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a float32 [N, H, W, C] batch in [0, 1]."""
        tensor = self._tf.constant(batch.astype(np.float32))
        out = self._fn(**{self._input_name: tensor})[self._output_name]
        return np.asarray(out, dtype=np.float32)

    def predict_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities for uint8 [H, W, C] frames at the model's size."""
        return self.predict(batch_input(pixels))


def select_runtime(
    artifact: LoadedArtifact,
    *,
    num_gpus: float = 0.0,
    num_threads: int = 1,
    gpu_precision: str = "float16",
) -> ModelRuntime:
    """The runtime a replica with these resources should use for this artifact."""
    if num_gpus > 0:
        if artifact.saved_model_path is None:
            raise ArtifactError(f"{artifact.directory}: a GPU replica needs saved_model/")
        return _saved_model(artifact, gpu_precision)
    if artifact.tflite_path is not None:
        return LiteRTRuntime(artifact.read_bytes("model.tflite"), num_threads=num_threads)
    if artifact.saved_model_path is not None:
        return _saved_model(artifact, "float32")
    raise ArtifactError(f"{artifact.directory}: neither model.tflite nor saved_model/ present")


def _saved_model(artifact: LoadedArtifact, precision: str) -> SavedModelRuntime:
    """The SavedModel loaded from a private copy of its verified bytes (TensorFlow reads a
    path, not bytes); the copy is removed once loaded (variables are read at load)."""
    copy = artifact.private_copy("saved_model")
    try:
        return SavedModelRuntime(copy, precision=precision)
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


class HealthSample:
    """A fixed, non-constant input and the model's answer on it, recorded at load.

    The health check runs the model on the same input and compares: a model whose weights,
    runtime or memory changed after load answers differently and the replica is reported
    unhealthy (a constant input hides much: a model that lost its weights may still answer
    a uniform distribution with the right shape). The input is noise, two gradients and a
    checkerboard, from a fixed seed: the same for every replica of every version.
    """

    ATOL = 1e-3  # int8 LiteRT is exact; float16 GPU kernels may reorder their sums

    def __init__(self, runtime: ModelRuntime, num_classes: int) -> None:
        h, w, c = runtime.input_hwc
        noise = np.random.default_rng(17).random((h, w, c), dtype=np.float32)
        across = np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32)[None, :, None], (h, w, c))
        down = np.broadcast_to(np.linspace(1, 0, h, dtype=np.float32)[:, None, None], (h, w, c))
        yy, xx = np.indices((h, w))
        checks = (((yy // 4) + (xx // 4)) % 2).astype(np.float32)
        board = np.broadcast_to(checks[..., None], (h, w, c))
        self.inputs = np.stack([noise, across, down, board]).astype(np.float32)
        self.num_classes = num_classes
        self.expected = self._run(runtime)

    def _run(self, runtime: ModelRuntime) -> np.ndarray:
        probs = runtime.predict(self.inputs)
        if probs.shape != (len(self.inputs), self.num_classes) or not np.all(np.isfinite(probs)):
            raise RuntimeError(
                f"health sample: the model returned shape {probs.shape}, expected "
                f"({len(self.inputs)}, {self.num_classes}) finite scores"
            )
        return probs

    def check(self, runtime: ModelRuntime) -> None:
        """Raise RuntimeError unless the model answers the sample as it did at load."""
        probs = self._run(runtime)
        drift = float(np.max(np.abs(probs - self.expected)))
        if drift > self.ATOL or not np.array_equal(
            probs.argmax(axis=1), self.expected.argmax(axis=1)
        ):
            raise RuntimeError(
                f"health sample: the model's output changed since load (max difference "
                f"{drift:.4g} > {self.ATOL}, classes {probs.argmax(axis=1).tolist()} vs "
                f"{self.expected.argmax(axis=1).tolist()} at load)"
            )
