"""The Ray Serve application: a verified artifact behind dynamic batching, with an HTTP API.

``import_path: serving.app:app`` names :func:`app`, an application builder that takes the
``args`` of a Serve config (see ``serving/serve_config.yaml``) and returns the application.

Two ways in:
- HTTP ``POST /classify`` (one JPEG/PNG, or an Arrow IPC stream of frames), ``GET /healthz``;
- the handle method ``classify_frames`` (many frames per call), which the stream classifier
  uses: one call per micro-batch, per-frame errors instead of a failed call.
"""

# No `from __future__ import annotations` here: FastAPI reads the real annotations of the
# ingress methods (``request: Request``) after Serve has serialized the class.
import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt
from ray import serve
from ray.serve.metrics import Counter, Histogram

from serving.artifacts import ArtifactError, LoadedArtifact, load_artifact
from serving.config import ServeSettings
from serving.frames import ARROW_CONTENT_TYPE, FrameRecord, FrameSchemaError, decode_frames
from serving.preprocess import (
    CONTENT_TYPES,
    DecodeLimits,
    FrameDecodeError,
    decode_frame,
    decode_image,
    to_model_input,
)
from serving.results import ClassifyResult, FrameAnswer, FrameError
from serving.runtimes import ModelRuntime, select_runtime

log = logging.getLogger("ray.serve")

_STATUS_BY_REASON = {
    "empty": 400,
    "undecodable": 400,
    "bad_arrow": 400,
    "bad_dimensions": 422,
    "too_large": 413,
    "too_many_pixels": 413,
    "unsupported_format": 415,
}
MAX_REQUEST_BYTES = 64 * 1024 * 1024
TOPK = 3

http = FastAPI(title="framecast", description="Video-frame classification")


class LoadedModel:
    """An artifact and the runtime that runs it, swapped as one unit on reconfigure."""

    def __init__(self, artifact: LoadedArtifact, runtime: ModelRuntime) -> None:
        self.artifact = artifact
        self.runtime = runtime
        manifest = artifact.manifest
        self.classes = list(manifest.classes)
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


def _canary(model: LoadedModel) -> None:
    h, w, c = model.runtime.input_hwc
    probs = model.runtime.predict(np.full((1, h, w, c), 0.5, dtype=np.float32))
    if probs.shape != (1, len(model.classes)) or not np.all(np.isfinite(probs)):
        raise RuntimeError(
            f"canary inference returned shape {probs.shape}, expected "
            f"(1, {len(model.classes)}) finite scores"
        )


def _error(status: int, reason: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail, **extra}, status_code=status)


class ReplicaConfig(BaseModel):
    """The user_config of a replica: changing it reconfigures replicas in place."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: str = Field(description="Artifact directory (absolute, visible to replicas).")
    max_batch_size: PositiveInt = Field(default=64, description="Dynamic batching size.")
    batch_wait_timeout_s: NonNegativeFloat = Field(default=0.005, description="Batch wait.")
    max_frame_bytes: PositiveInt = Field(default=8 * 1024 * 1024, description="Per-frame bytes.")
    max_frame_pixels: PositiveInt = Field(default=3840 * 2160, description="Per-frame pixels.")
    gpu_precision: Literal["float16", "float32"] = Field(
        default="float16", description="SavedModel precision on GPU replicas."
    )
    niceness: int | None = Field(
        default=None, ge=-20, le=19, description="Niceness of the replica's threads."
    )


def set_niceness(niceness: int) -> bool:
    """Give every thread of this process ``niceness`` (Linux keeps one per thread; threads
    started later inherit their creator's). False, with a warning, where not permitted."""
    try:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
    except (PermissionError, FileNotFoundError) as error:
        log.warning(
            "replica niceness %d not set (%s): it keeps Ray's worker niceness; grant "
            "CAP_SYS_NICE or start Ray with RAY_worker_niceness=%d",
            niceness,
            error,
            niceness,
        )
        return False
    return True


@serve.deployment(
    name="Classifier",
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress(http)
class Classifier:
    """One replica: decodes frames, batches them, runs the model, answers per frame."""

    def __init__(self) -> None:
        import ray

        resources = ray.get_runtime_context().get_assigned_resources()
        self.num_gpus = float(resources.get("GPU", 0.0))
        self.num_threads = max(1, int(resources.get("CPU", 1.0)))
        self.model: LoadedModel | None = None
        self.config: ReplicaConfig | None = None
        self.limits = DecodeLimits()
        self.frames = Counter(
            "framecast_frames_total", "Frames classified or refused.", tag_keys=("outcome",)
        )
        self.errors = Counter(
            "framecast_errors_total", "Refused frames by reason.", tag_keys=("reason",)
        )
        self.batch_sizes = Histogram(
            "framecast_batch_size",
            "Frames per model call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
        )
        self.inference_ms = Histogram(
            "framecast_inference_ms",
            "Model time per call (ms).",
            boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500],
        )

    # -- life cycle -------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new user_config; a new artifact_dir hot-swaps the model."""
        config = ReplicaConfig.model_validate(user_config)
        old = self.config
        if (
            old is None
            or config.artifact_dir != old.artifact_dir
            or config.gpu_precision != old.gpu_precision
        ):
            model = self._load(config.artifact_dir, config.gpu_precision)
            self.model = model  # one assignment: in-flight calls keep the model they started with
            log.info(
                "serving %s %s (%s, %s)",
                model.info["name"],
                model.info["version"],
                model.info["runtime"],
                model.info["precision"],
            )
        if config.niceness is not None and (old is None or old.niceness != config.niceness):
            set_niceness(config.niceness)
        self.limits = DecodeLimits(
            max_bytes=config.max_frame_bytes, max_pixels=config.max_frame_pixels
        )
        batcher: Any = self._infer_one  # @serve.batch adds these setters at runtime
        batcher.set_max_batch_size(config.max_batch_size)
        batcher.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.config = config

    def _load(self, artifact_dir: str, gpu_precision: str) -> LoadedModel:
        artifact = load_artifact(artifact_dir)  # verifies every checksum
        runtime = select_runtime(
            artifact,
            num_gpus=self.num_gpus,
            num_threads=self.num_threads,
            gpu_precision=gpu_precision,
        )
        model = LoadedModel(artifact, runtime)
        _canary(model)
        return model

    def check_health(self) -> None:
        """Serve's health check: a canary inference must succeed."""
        if self.model is None:
            raise RuntimeError("no model loaded (user_config.artifact_dir missing?)")
        _canary(self.model)

    # -- inference --------------------------------------------------------------------------
    def _require_model(self) -> LoadedModel:
        if self.model is None:
            raise RuntimeError("no model loaded")
        return self.model

    def _predict(self, model: LoadedModel, batch: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        probs = model.runtime.predict(batch)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.batch_sizes.observe(len(batch))
        self.inference_ms.observe(elapsed_ms)
        return probs, elapsed_ms

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _infer_one(self, tensors: list[np.ndarray]) -> list[ClassifyResult]:
        model = self._require_model()
        probs, ms = await asyncio.to_thread(self._predict, model, np.stack(tensors))
        return model.results(probs, ms)

    def _prepare(
        self, model: LoadedModel, frames: list[FrameRecord]
    ) -> tuple[list[np.ndarray | None], list[FrameError | None]]:
        h, w, c = model.runtime.input_hwc
        tensors: list[np.ndarray | None] = []
        errors: list[FrameError | None] = []
        for frame in frames:
            try:
                tensors.append(to_model_input(decode_frame(frame, self.limits), h, w, c))
                errors.append(None)
            except FrameDecodeError as error:
                tensors.append(None)
                errors.append(FrameError(error.reason, error.detail))
                self.errors.inc(tags={"reason": error.reason})
        return tensors, errors

    async def classify_frames(
        self, frames: list[FrameRecord], topk: bool = True
    ) -> list[FrameAnswer]:
        """Classify many frames in one call: a ClassifyResult per frame, or a FrameError for
        a bad one (no exception).

        ``topk=False`` leaves each result's ``topk`` list out (less to serialize per frame).
        """
        model = self._require_model()
        # One hop to a worker thread for decoding and inference together: a hop costs as
        # much as decoding a few frames, and a stream sends hundreds of calls a second.
        results, good = await asyncio.to_thread(self._classify, model, frames, topk)
        if good:  # Ray metrics refuse an increment of zero
            self.frames.inc(good, tags={"outcome": "classified"})
        if len(frames) > good:
            self.frames.inc(len(frames) - good, tags={"outcome": "refused"})
        return results

    def _classify(
        self, model: LoadedModel, frames: list[FrameRecord], topk: bool
    ) -> tuple[list[FrameAnswer], int]:
        """(one answer per frame, how many frames were classified) - in a worker thread."""
        tensors, errors = self._prepare(model, frames)
        good = [i for i, t in enumerate(tensors) if t is not None]
        results: list[Any] = list(errors)  # the good ones' None is replaced below
        if good:
            batch = np.stack([tensors[i] for i in good])  # type: ignore[misc]
            probs, ms = self._predict(model, batch)
            for i, result in zip(good, model.results(probs, ms, topk), strict=True):
                results[i] = result
        return results, len(good)

    # -- HTTP -------------------------------------------------------------------------------
    @http.post("/classify")
    async def http_classify(self, request: Request) -> JSONResponse:
        """One JPEG/PNG image, or an Arrow IPC stream of frames (returns a list)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_REQUEST_BYTES:
            return _error(413, "too_large", f"body of {declared} bytes > {MAX_REQUEST_BYTES}")
        body = await request.body()
        if len(body) > MAX_REQUEST_BYTES:
            return _error(413, "too_large", f"body of {len(body)} bytes > {MAX_REQUEST_BYTES}")
        if content_type == ARROW_CONTENT_TYPE:
            try:
                frames = decode_frames(body)
            except FrameSchemaError as error:
                self.errors.inc(tags={"reason": "bad_arrow"})
                return _error(400, "bad_arrow", str(error))
            answers = await self.classify_frames(frames)
            results = [answer.to_json() for answer in answers]
            first = answers[0] if answers else None
            if isinstance(first, FrameError) and all(isinstance(a, FrameError) for a in answers):
                return _error(
                    _STATUS_BY_REASON.get(first.reason, 400),
                    first.reason,
                    first.detail,
                    results=results,
                )
            return JSONResponse(results)
        encoding = CONTENT_TYPES.get(content_type)
        if encoding is None:
            return _error(
                415,
                "unsupported_format",
                f"content-type {content_type or '(none)'} is not image/jpeg, image/png "
                f"or {ARROW_CONTENT_TYPE}",
            )
        model = self._require_model()
        h, w, c = model.runtime.input_hwc
        try:
            tensor = to_model_input(decode_image(body, encoding, self.limits), h, w, c)
        except FrameDecodeError as error:
            self.errors.inc(tags={"reason": error.reason})
            self.frames.inc(tags={"outcome": "refused"})
            return _error(_STATUS_BY_REASON.get(error.reason, 400), error.reason, error.detail)
        result = await self._infer_one(tensor)
        self.frames.inc(tags={"outcome": "classified"})
        return JSONResponse(result.to_json())

    @http.get("/healthz")
    def healthz(self) -> JSONResponse:
        """Liveness plus a canary inference."""
        try:
            self.check_health()
        except (RuntimeError, ValueError, ArtifactError) as error:
            return JSONResponse({"status": "unhealthy", "detail": str(error)}, status_code=503)
        model = self._require_model()
        return JSONResponse(
            {"status": "ok", "model": model.info, "input": list(model.runtime.input_hwc)}
        )


class AppArgs(BaseModel):
    """The ``args`` of the Serve config: which artifact, and the serving knobs."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: str = Field(description="Artifact directory to serve.")
    serve: ServeSettings = Field(default_factory=ServeSettings)


def deployment_options(settings: ServeSettings) -> dict[str, Any]:
    """Ray Serve deployment options (autoscaling, backpressure, resources) from settings.

    A fixed replica count (min = max) is deployed as ``num_replicas``, not as autoscaling:
    autoscaling has every handle and replica report request metrics to the controller
    several times a second, which costs CPU and changes nothing when there is no range.
    """
    scaling: dict[str, Any] = (
        {"num_replicas": settings.min_replicas}
        if settings.min_replicas == settings.max_replicas
        else {
            "autoscaling_config": {
                "min_replicas": settings.min_replicas,
                "max_replicas": settings.max_replicas,
                "target_ongoing_requests": settings.target_ongoing_requests,
                "upscale_delay_s": 5.0,
                "downscale_delay_s": 30.0,
            }
        }
    )
    return {
        **scaling,
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "logging_config": {"enable_access_log": settings.access_log},
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    }


def app(args: dict[str, Any]) -> Any:
    """Application builder for ``import_path: serving.app:app``."""
    parsed = AppArgs.model_validate(args)
    settings = parsed.serve
    artifact_dir = Path(parsed.artifact_dir)
    if artifact_dir.is_dir():  # relative paths mean "relative to where the app is built"
        artifact_dir = artifact_dir.resolve()
    user_config = ReplicaConfig(
        artifact_dir=str(artifact_dir),
        max_batch_size=settings.max_batch_size,
        batch_wait_timeout_s=settings.batch_wait_timeout_s,
        gpu_precision=settings.gpu_precision,
        niceness=settings.replica_niceness,
    )
    return Classifier.options(  # type: ignore[attr-defined]
        **deployment_options(settings), user_config=user_config.model_dump()
    ).bind()
