"""Classifying a call's frames with a loaded model: what a Serve replica does per call, as
plain code that also runs in the stream classifier's own process.

- :class:`LoadedModel`: a verified artifact and the runtime that runs it (one unit, swapped
  as one on a replica's reconfigure), and the per-frame answers of its output.
- :class:`FrameClassifier`: one call's frames -> one answer per frame. A call is cut at
  ``max_call_frames`` frames and ``max_call_bytes`` bytes (the rest answered ``FrameError``)
  and decoded and run ``max_batch_size`` frames at a time; a bad frame gets its
  ``FrameError``, never an exception. Metrics are the caller's (callbacks), so no Ray here.
- :class:`LocalClassify`: the stream classifier's ``classify(frames)`` without Serve: the
  int8 LiteRT model in a worker thread of the classifier's process (``framecast stream run
  --local-model``). No network hop and no second process per call; what it gives up is what
  Serve is for (replicas on other nodes and GPUs, decoding isolated from the consumer,
  scaling inference apart from consumption, HTTP).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.artifacts import ArtifactError, LoadedArtifact
from serving.config import StorageSettings
from serving.frames import FrameRecord
from serving.preprocess import DecodeLimits, FrameDecodeError, frame_pixels
from serving.results import ClassifyResult, FrameAnswer, FrameError
from serving.runtimes import HealthSample, ModelRuntime, select_runtime

TOPK = 3


class LoadedModel:
    """An artifact and the runtime that runs it, swapped as one unit on reconfigure."""

    def __init__(self, artifact: LoadedArtifact, runtime: ModelRuntime) -> None:
        self.artifact = artifact.model_copy(update={"contents": {}})  # the runtime has them
        self.runtime = runtime
        manifest = artifact.manifest
        self.classes = list(manifest.classes)
        self.health = HealthSample(runtime, len(self.classes))  # runs the model once
        primary = manifest.files.get(manifest.primary)
        self.info = {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": primary.sha256 if primary else None,
            "runtime": runtime.kind,
            "precision": runtime.precision,
        }

    def results(
        self, probs: np.ndarray, inference_ms: float, topk: bool = True
    ) -> list[ClassifyResult]:
        """The answer for each row of class probabilities (without ``topk`` when ``topk`` is
        False: the stream classifier labels with the top class only)."""
        # One argsort for the whole batch (highest first; ties to the lower class id, as
        # argmax): a replica answers thousands of frames per second.
        order = np.argsort(-probs, axis=1, kind="stable")[:, : TOPK if topk else 1]
        scores = np.take_along_axis(probs, order, axis=1).tolist()
        classes, info, ms = self.classes, self.info, round(inference_ms, 3)
        out = []
        for ids, row_scores in zip(order.tolist(), scores, strict=True):
            best, score = ids[0], row_scores[0]
            top = (
                [
                    {"class_id": i, "label": classes[i], "score": s}
                    for i, s in zip(ids, row_scores, strict=True)
                ]
                if topk
                else None
            )
            out.append(ClassifyResult(best, classes[best], score, info, ms, top))
        return out


@dataclass(frozen=True)
class CallLimits:
    """How much of one call is classified, and how many frames go through the model at once."""

    max_batch_size: int = 64
    max_call_frames: int = 4096
    max_call_bytes: int = 64 * 1024 * 1024
    decode: DecodeLimits = field(default_factory=DecodeLimits)


def _ignore_refusal(_reason: str) -> None:
    return None


def _ignore_batch(_size: int, _ms: float) -> None:
    return None


class FrameClassifier:
    """One call's frames through a model; ``on_refused(reason)`` for each refused frame and
    ``on_batch(frames, ms)`` for each model run (a replica's Ray metrics)."""

    def __init__(
        self,
        on_refused: Callable[[str], None] = _ignore_refusal,
        on_batch: Callable[[int, float], None] = _ignore_batch,
    ) -> None:
        self.on_refused = on_refused
        self.on_batch = on_batch

    def predict(
        self, model: LoadedModel, batch: np.ndarray | list[np.ndarray]
    ) -> tuple[np.ndarray, float]:
        """Class probabilities of a batch, and the model's ms for it: a float32 batch in
        [0, 1], or a list of uint8 frames (converted straight to the model's input dtype)."""
        started = time.perf_counter()
        if isinstance(batch, list):
            probs = model.runtime.predict_pixels(batch)
        else:
            probs = model.runtime.predict(batch)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.on_batch(len(batch), elapsed_ms)
        return probs, elapsed_ms

    def prepare(
        self,
        model: LoadedModel,
        frames: list[FrameRecord],
        limits: DecodeLimits,
        decode_ms: list[float],
    ) -> tuple[list[np.ndarray | None], list[FrameError | None]]:
        """Each frame's uint8 model input or its error; its decoding ms into ``decode_ms``."""
        hwc = model.runtime.input_hwc
        tensors: list[np.ndarray | None] = []
        errors: list[FrameError | None] = []
        clock = time.perf_counter
        for frame in frames:
            try:
                started = clock()
                tensors.append(frame_pixels(frame, limits, hwc))
                decode_ms.append((clock() - started) * 1000)
                errors.append(None)
            except FrameDecodeError as error:
                tensors.append(None)
                errors.append(FrameError(error.reason, error.detail))
                self.on_refused(error.reason)
        return tensors, errors

    def admit(
        self, limits: CallLimits, frames: list[FrameRecord], answers: list[Any]
    ) -> list[int]:
        """Indices of the frames within the call's bounds; the others get their FrameError."""
        admitted: list[int] = []
        total = 0
        for i, frame in enumerate(frames):
            total += len(frame.data)
            if i >= limits.max_call_frames:
                answers[i] = FrameError(
                    "too_many_frames",
                    f"frame {i} of a call of {len(frames)}: over the limit of "
                    f"{limits.max_call_frames} frames per call",
                )
            elif total > limits.max_call_bytes:
                answers[i] = FrameError(
                    "too_large",
                    f"frame {i}: the call's frames reach {total} bytes, over the limit of "
                    f"{limits.max_call_bytes} bytes per call",
                )
            else:
                admitted.append(i)
                continue
            self.on_refused(answers[i].reason)
        return admitted

    def classify(
        self, model: LoadedModel, limits: CallLimits, frames: list[FrameRecord], topk: bool
    ) -> tuple[list[FrameAnswer], int]:
        """(one answer per frame, how many frames were classified).

        Frames are decoded and run ``max_batch_size`` at a time: the decoded tensors of a
        call never exceed one chunk (a 1024-frame call of 224x224x3 float32 would be 600 MB
        at once), and only one frame is ever decoded at full size.
        """
        answers: list[Any] = [None] * len(frames)  # every None is replaced below
        admitted = self.admit(limits, frames, answers)
        classified = 0
        for start in range(0, len(admitted), limits.max_batch_size):
            chunk = admitted[start : start + limits.max_batch_size]
            decode_ms: list[float] = []  # of the decoded frames, in order
            tensors, errors = self.prepare(
                model, [frames[i] for i in chunk], limits.decode, decode_ms
            )
            good = []
            for k, error in enumerate(errors):
                if error is None:
                    good.append(k)
                else:
                    answers[chunk[k]] = error
            if good:
                pixels: list[np.ndarray] = [tensors[k] for k in good]  # type: ignore[misc]
                del tensors  # the good frames are all that is needed now
                probs, ms = self.predict(model, pixels)
                results = model.results(probs, ms, topk)
                for k, result, spent in zip(good, results, decode_ms, strict=True):
                    result.decode_ms = round(spent, 3)
                    answers[chunk[k]] = result
                classified += len(good)
        return answers, classified


class LocalResponse:
    """A call in the worker thread, answered like a Serve response (``result``, ``cancel``)."""

    def __init__(self, future: Future[tuple[list[FrameAnswer], int]]) -> None:
        self.future = future

    def result(self, timeout_s: float | None = None) -> list[FrameAnswer]:
        """The answers; TimeoutError while the call is still running after ``timeout_s``."""
        return self.future.result(timeout=timeout_s)[0]

    def cancel(self) -> None:
        """Drop the call if it has not started (a running model call finishes on its own)."""
        self.future.cancel()


class LocalClassify:
    """``classify(frames)`` in this process: an artifact's int8 LiteRT model, verified like a
    replica's (every checksum, then the health sample), run in one worker thread.

    ``location`` is a directory or an object-store URI (fetched and verified as replicas
    do). Only LiteRT runs here: the stream classifier's process has no TensorFlow, so an
    artifact without ``model.tflite`` is refused.
    """

    def __init__(
        self,
        location: str,
        storage: StorageSettings | None = None,
        *,
        threads: int = 1,
        limits: CallLimits | None = None,
    ) -> None:
        from serving.storage import load_location

        artifact = load_location(location, storage)
        if "model.tflite" not in artifact.manifest.files:
            raise ArtifactError(
                f"{location}: no model.tflite - in-process inference runs LiteRT models only "
                "(serve a SavedModel with `framecast serve deploy` instead)"
            )
        runtime = select_runtime(artifact, num_gpus=0, num_threads=threads)
        self.model = LoadedModel(artifact, runtime)
        self.limits = limits or CallLimits()
        self.inference = FrameClassifier()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="framecast-inference")

    def __call__(self, frames: list[FrameRecord]) -> LocalResponse:
        return LocalResponse(
            self._pool.submit(self.inference.classify, self.model, self.limits, frames, False)
        )

    def close(self) -> None:
        """Finish the running call and drop the queued ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)
