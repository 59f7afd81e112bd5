"""Evaluation of an artifact: classification metrics, latency, throughput, size and memory."""

from __future__ import annotations

import gzip
import os
import resource
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jobs.data import load_dataset, normalize
from jobs.exceptions import DatasetError, OptionError
from serving.artifacts import ArtifactError, LoadedArtifact, load_artifact

RUNTIMES = ("auto", "tflite", "saved_model")
LATENCY_WARMUP = 20
LATENCY_SAMPLES = 1000  # ~0.5 s for the int8 model: short windows caught background blips
THROUGHPUT_BATCHES = (1, 8, 32, 128)
PREDICT_BATCH = 256


class Runner(Protocol):
    """Something that turns uint8 NHWC images into class probabilities."""

    runtime: str

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for uint8 images [N, H, W, C]."""
        ...


class LiteRTRunner:
    """Runs a .tflite model with the LiteRT interpreter; quantizes/dequantizes int8 I/O."""

    runtime = "tflite"

    def __init__(self, path: Path, num_threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = -1

    @property
    def input_dtype(self) -> np.dtype:
        """dtype of the model's input tensor."""
        return np.dtype(self._input["dtype"])

    @property
    def output_dtype(self) -> np.dtype:
        """dtype of the model's output tensor."""
        return np.dtype(self._output["dtype"])

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            shape = [batch, *self._input["shape"][1:]]
            self._interpreter.resize_tensor_input(self._input["index"], shape)
            self._interpreter.allocate_tensors()
            self._input = self._interpreter.get_input_details()[0]
            self._output = self._interpreter.get_output_details()[0]
            self._batch = batch

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for uint8 images [N, H, W, C]."""
        self._resize(len(images))
        floats = normalize(images)
        if np.issubdtype(self.input_dtype, np.integer):
            scale, zero = self._input["quantization"]
            info = np.iinfo(self.input_dtype)
            feed = np.clip(np.round(floats / scale) + zero, info.min, info.max)
            feed = feed.astype(self.input_dtype)
        else:
            feed = floats.astype(self.input_dtype)
        self._interpreter.set_tensor(self._input["index"], feed)
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._output["index"])
        if np.issubdtype(self.output_dtype, np.integer):
            scale, zero = self._output["quantization"]
            return (raw.astype(np.float32) - zero) * scale
        return raw.astype(np.float32)


class SavedModelRunner:
    """Runs the float SavedModel's serving signature with TensorFlow."""

    runtime = "saved_model"

    def __init__(self, path: Path, num_threads: int = 1) -> None:
        from jobs.tf_env import tf

        _set_tf_threads(tf, num_threads)
        self._tf = tf
        loaded = tf.saved_model.load(str(path))
        self._keep = loaded
        self._signature = loaded.signatures["serving_default"]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for uint8 images [N, H, W, C]."""
        result = self._signature(images=self._tf.constant(normalize(images)))
        return np.asarray(result["probabilities"])


def _set_tf_threads(tf: Any, num_threads: int) -> None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(num_threads)
    except RuntimeError:
        pass  # the TF runtime is already initialized in this process; keep its setting


def open_runner(artifact: LoadedArtifact, runtime: str = "auto", num_threads: int = 1) -> Runner:
    """The runner for an artifact: LiteRT for model.tflite, TensorFlow for the SavedModel."""
    if runtime not in RUNTIMES:
        raise OptionError(f"unknown runtime {runtime!r}; expected one of: {', '.join(RUNTIMES)}")
    if runtime in ("auto", "tflite") and artifact.tflite_path is not None:
        return LiteRTRunner(artifact.tflite_path, num_threads=num_threads)
    if runtime == "tflite":
        raise ArtifactError(f"{artifact.directory}: has no model.tflite")
    if artifact.saved_model_path is None:
        raise ArtifactError(f"{artifact.directory}: has neither model.tflite nor saved_model/")
    return SavedModelRunner(artifact.saved_model_path, num_threads=num_threads)


def predict_all(runner: Runner, images: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
    """Probabilities for all images, in batches."""
    parts = [runner.predict(images[i:i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           num_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 (0 where undefined) and the confusion matrix."""
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of the same length, "
                         f"got {y_true.shape} and {y_pred.shape}")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(true_pos, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros(num_classes), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(num_classes), where=denom > 0)
    return {
        "accuracy": float(true_pos.sum() / max(1, len(y_true))),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "confusion_matrix": confusion.tolist(),
    }


def measure_latency(runner: Runner, images: np.ndarray, samples: int = LATENCY_SAMPLES,
                    warmup: int = LATENCY_WARMUP) -> dict[str, float]:
    """p50/p99 milliseconds of single-image inference (batch 1)."""
    count = min(samples, len(images))
    for index in range(min(warmup, len(images))):
        runner.predict(images[index:index + 1])
    timings = []
    for index in range(count):
        start = time.perf_counter()
        runner.predict(images[index:index + 1])
        timings.append((time.perf_counter() - start) * 1000.0)
    return {"latency_ms_p50": float(np.percentile(timings, 50)),
            "latency_ms_p99": float(np.percentile(timings, 99)),
            "latency_ms_mean": float(np.mean(timings))}


def measure_throughput(runner: Runner, images: np.ndarray,
                       batches: tuple[int, ...] = THROUGHPUT_BATCHES,
                       min_seconds: float = 0.5) -> dict[str, Any]:
    """Best images/second over the batch sizes, and the batch that achieved it."""
    best, best_batch = 0.0, 1
    per_batch: dict[str, float] = {}
    for batch in batches:
        if batch > len(images):
            continue
        chunk = images[:batch]
        runner.predict(chunk)
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds or done == 0:
            runner.predict(chunk)
            done += batch
        rate = done / elapsed
        per_batch[str(batch)] = rate
        if rate > best:
            best, best_batch = rate, batch
    return {"throughput_ips": best, "throughput_batch": best_batch,
            "throughput_by_batch": per_batch}


def _threads_in_use(runner: Runner, asked: int) -> int:
    """Threads a runner really uses: TF's setting is per process and fixed at first use."""
    if runner.runtime != "saved_model":
        return asked
    from jobs.tf_env import tf

    configured = tf.config.threading.get_intra_op_parallelism_threads()
    return configured or (os.cpu_count() or 1)


def artifact_size(artifact: LoadedArtifact, runner: Runner) -> tuple[int, int]:
    """(bytes, gzip bytes) of the model the runner runs (all SavedModel files together)."""
    if runner.runtime == "tflite" and artifact.tflite_path is not None:
        paths = [artifact.tflite_path]
    else:
        paths = [artifact.directory / name for name in artifact.manifest.files
                 if name.startswith("saved_model/")]
    raw = b"".join(path.read_bytes() for path in sorted(paths))
    return len(raw), len(gzip.compress(raw, compresslevel=9, mtime=0))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def evaluate_loaded(artifact: LoadedArtifact, images: np.ndarray, labels: np.ndarray, *,
                    runtime: str = "auto", speed: bool = True) -> dict[str, Any]:
    """All metrics JSON keys for a verified artifact on the given uint8 images and labels."""
    if len(labels) == 0:
        raise ValueError("evaluation needs at least one image")
    manifest = artifact.manifest
    expected = tuple(d for d in manifest.input.shape[1:])
    if tuple(images.shape[1:]) != expected:
        raise DatasetError(f"images have shape {images.shape[1:]}, the model expects {expected}")
    runner = open_runner(artifact, runtime=runtime, num_threads=1)
    probabilities = predict_all(runner, images)
    metrics = classification_metrics(labels, probabilities.argmax(axis=1), len(manifest.classes))
    if speed:
        metrics.update(measure_latency(runner, images))
        metrics["latency_threads"] = _threads_in_use(runner, 1)
        threads = os.cpu_count() or 1
        throughput_runner = open_runner(artifact, runtime=runner.runtime, num_threads=threads)
        metrics.update(measure_throughput(throughput_runner, images))
        metrics["throughput_threads"] = _threads_in_use(throughput_runner, threads)
    size, gz = artifact_size(artifact, runner)
    metrics.update({
        "runtime": runner.runtime,
        "size_bytes": size,
        "gzip_bytes": gz,
        "param_count": manifest.param_count,
        "sparsity": manifest.optimization.measured_sparsity,
        "peak_rss_mb": peak_rss_mb(),
        "samples": len(labels),
    })
    return metrics


def evaluate_artifact(directory: Path, dataset: str | None = None, limit: int | None = None,
                      runtime: str = "auto", speed: bool = True) -> dict[str, Any]:
    """Verify an artifact and evaluate it on the test split of dataset (default: its own)."""
    artifact = load_artifact(directory)
    name = dataset or artifact.manifest.training.dataset
    # At the model's own input size (scenes are rendered at it, other datasets resized).
    height, width = artifact.manifest.input.shape[1:3]
    data = load_dataset(name, limit=1, test_limit=limit, seed=artifact.manifest.training.seed,
                        input_size=height if height == width else None)
    if len(data.classes) != len(artifact.manifest.classes):
        raise DatasetError(f"dataset {name} has {len(data.classes)} classes, the model "
                         f"{len(artifact.manifest.classes)}")
    metrics = evaluate_loaded(artifact, data.x_test, data.y_test, runtime=runtime, speed=speed)
    metrics["dataset"] = name
    return metrics


def main(argv: list[str] | None = None) -> None:
    """``python -m jobs.evaluate DIR``: evaluate in a fresh process (one TF thread setting)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=main.__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES)
    args = parser.parse_args(argv)
    metrics = evaluate_artifact(args.artifact, dataset=args.dataset, limit=args.limit,
                                runtime=args.runtime)
    sys.stdout.write(json.dumps(metrics, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
