"""The Ray Serve application: a verified artifact behind dynamic batching, with an HTTP API.

``import_path: serving.app:app`` names :func:`app`, an application builder that takes the
``args`` of a Serve config (see ``serving/serve_config.yaml``) and returns the application.

Two ways in:
- HTTP ``POST /classify`` (one JPEG/PNG, or an Arrow IPC stream of frames), ``GET /healthz``;
- the handle method ``classify_frames`` (many frames per call), which the stream classifier
  uses: one call per micro-batch, per-frame errors instead of a failed call.

No input stops a replica or grows it without bound: a call is cut at ``max_call_frames``
frames and ``max_call_bytes`` bytes (the rest answered ``FrameError``) and decoded and run
``max_batch_size`` frames at a time; an HTTP body is read up to ``MAX_REQUEST_BYTES`` whether
or not it declares its length; HTTP requests hold at most ``http_max_ongoing_requests`` of a
replica's slots (the rest stay for the stream's handle calls) for at most
``http_request_timeout_s``; decoding runs in worker threads, never on the event loop.
"""

# No `from __future__ import annotations` here: FastAPI reads the real annotations of the
# ingress methods (``request: Request``) after Serve has serialized the class.
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.requests import ClientDisconnect

from serving.artifacts import ArtifactError
from serving.config import ServeSettings, StorageSettings
from serving.frames import (
    ARROW_CONTENT_TYPE,
    FrameRecord,
    FrameSchemaError,
    RowError,
    decode_frame_rows,
)
from serving.inference import CallLimits, FrameClassifier, LoadedModel
from serving.preprocess import (
    CONTENT_TYPES,
    DecodeLimits,
    FrameDecodeError,
    image_pixels,
)
from serving.results import ClassifyResult, FrameAnswer, FrameError
from serving.runtimes import select_runtime
from serving.storage import is_uri, load_location, verify_location

log = logging.getLogger("ray.serve")

_STATUS_BY_REASON = {
    "empty": 400,
    "undecodable": 400,
    "bad_arrow": 400,
    "bad_dimensions": 422,
    "too_large": 413,
    "too_many_frames": 413,
    "too_many_pixels": 413,
    "unsupported_format": 415,
}
MAX_REQUEST_BYTES = 64 * 1024 * 1024
TOKEN_ENV = "FRAMECAST_SERVE_HTTP_TOKEN"  # noqa: S105 - a variable name, not a token

# No /docs, /redoc or /openapi.json unless serve.http_docs: the routes below serve them then.
http = FastAPI(
    title="framecast",
    description="Video-frame classification",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def _error(
    status: int,
    reason: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        {"error": reason, "detail": detail, **extra}, status_code=status, headers=headers
    )


RETRY_AFTER = {"Retry-After": "1"}


def token_verifier(token: str) -> tuple[str, str]:
    """(salt, HMAC-SHA256 of the token under it), hex: what replicas get instead of the token."""
    salt = secrets.token_hex(16)
    return salt, _token_mac(salt, token.encode())


def _token_mac(salt: str, token: bytes) -> str:
    return hmac.new(bytes.fromhex(salt), token, hashlib.sha256).hexdigest()


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
    max_call_frames: PositiveInt = Field(default=4096, description="Frames per call.")
    max_call_bytes: PositiveInt = Field(default=64 * 1024 * 1024, description="Bytes per call.")
    http_request_timeout_s: PositiveFloat = Field(default=30.0, description="HTTP time limit.")
    http_max_ongoing_requests: PositiveInt = Field(default=4, description="HTTP requests at once.")
    http_docs: bool = Field(default=False, description="Serve /docs and /openapi.json.")
    # Never the token itself: user_config shows in `serve status` details and the dashboard.
    http_token_salt: str | None = Field(default=None, description="Salt of the token's HMAC.")
    http_token_hmac: str | None = Field(
        default=None, description="HMAC-SHA256 of the bearer token (unset: no token needed)."
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


async def _read_body(request: Request) -> bytes | JSONResponse:
    """The body, read up to MAX_REQUEST_BYTES whether or not it declares its length (a
    chunked body is counted as it arrives and refused once over: 413)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            return _error(400, "bad_request", "Content-Length is not a number")
        if int(declared) > MAX_REQUEST_BYTES:
            return _error(413, "too_large", f"body of {declared} bytes > {MAX_REQUEST_BYTES}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > MAX_REQUEST_BYTES:
                return _error(
                    413, "too_large", f"body over {MAX_REQUEST_BYTES} bytes: stopped reading"
                )
            body += chunk
    except ClientDisconnect:
        return _error(400, "client_disconnected", "the client went away mid-body")
    # Decoders take any buffer: no copy of up to 64 MiB into bytes.
    return cast(bytes, body)


def _decode_arrow(body: bytes, max_rows: int) -> list[FrameRecord]:
    """The frames of an Arrow body (FrameSchemaError when any row is not a frame)."""
    frames: list[FrameRecord] = []
    for row in decode_frame_rows(body, max_rows=max_rows):
        if isinstance(row, RowError):
            raise FrameSchemaError(f"row {row.row}: {row.detail}")
        frames.append(row)
    return frames


def _image_input(
    body: bytes, encoding: str, limits: DecodeLimits, hwc: tuple[int, int, int]
) -> np.ndarray:
    """One JPEG/PNG body as the model's uint8 pixels (in a worker thread: decoding takes
    milliseconds); the batch converts them to the model's input dtype at once."""
    return image_pixels(body, encoding, limits, hwc)


# Module functions the class uses are defined above it: serve.ingress pickles the class
# when it is decorated, with the globals that exist then.
@serve.deployment(
    name="Classifier",
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress(http)
class Classifier:
    """One replica: decodes frames, batches them, runs the model, answers per frame."""

    def __init__(self, storage: StorageSettings | None = None) -> None:
        import ray

        # Object-store credentials (SecretStr) come as this constructor argument: never in
        # user_config or runtime_env, which `serve status` and the dashboard show.
        self.storage = storage
        context: Any = ray.get_runtime_context()  # untyped in Ray
        resources = context.get_assigned_resources()
        self.num_gpus = float(resources.get("GPU", 0.0))
        self.num_threads = max(1, int(resources.get("CPU", 1.0)))
        self.model: LoadedModel | None = None
        self.config: ReplicaConfig | None = None
        self.update_refused: str | None = None  # why the last new artifact was not loaded
        self.http_ongoing = 0  # HTTP requests in progress (all on the replica's event loop)
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
        self.inference = FrameClassifier(on_refused=self._refused, on_batch=self._observe_batch)

    # -- life cycle -------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new user_config; a new artifact_dir hot-swaps the model.

        A new artifact is verified like the first one (every checksum, then the health
        sample). One that fails keeps the old model serving: raising here would have Serve
        replace this replica, and its replacement could load nothing. The refusal is logged
        and shown by /healthz (``update_refused``) until a good artifact is configured.
        """
        config = ReplicaConfig.model_validate(user_config)
        old = self.config
        if (
            old is None
            or config.artifact_dir != old.artifact_dir
            or config.gpu_precision != old.gpu_precision
        ):
            try:
                model = self._load(config.artifact_dir, config.gpu_precision)
            except Exception as error:  # whatever failed, a serving model keeps serving
                if old is None or self.model is None:
                    raise
                self.update_refused = f"{config.artifact_dir}: {error}"
                log.error(
                    "refused to swap in %s, still serving %s %s: %s",
                    config.artifact_dir,
                    self.model.info["name"],
                    self.model.info["version"],
                    error,
                )
                config = config.model_copy(
                    update={"artifact_dir": old.artifact_dir, "gpu_precision": old.gpu_precision}
                )
            else:
                self.model = model  # one assignment: in-flight calls keep the model they had
                self.update_refused = None
                log.info(
                    "serving %s %s (%s, %s)",
                    model.info["name"],
                    model.info["version"],
                    model.info["runtime"],
                    model.info["precision"],
                )
        else:  # the config names the model being served: nothing refused any more
            self.update_refused = None
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
        # reads and verifies every file once (a URI: fetched into this node's cache first)
        artifact = load_location(artifact_dir, self.storage)
        runtime = select_runtime(  # from the verified bytes, not from the directory again
            artifact,
            num_gpus=self.num_gpus,
            num_threads=self.num_threads,
            gpu_precision=gpu_precision,
        )
        return LoadedModel(artifact, runtime)  # records the health sample's answer

    def check_health(self) -> None:
        """Serve's health check: the model answers the health sample as it did at load."""
        if self.model is None:
            raise RuntimeError("no model loaded (user_config.artifact_dir missing?)")
        self.model.health.check(self.model.runtime)

    # -- inference --------------------------------------------------------------------------
    def _require_model(self) -> LoadedModel:
        if self.model is None:
            raise RuntimeError("no model loaded")
        return self.model

    def _require_config(self) -> ReplicaConfig:
        if self.config is None:
            raise RuntimeError("no user_config applied")
        return self.config

    def _refused(self, reason: str) -> None:
        self.errors.inc(tags={"reason": reason})

    def _observe_batch(self, size: int, elapsed_ms: float) -> None:
        self.batch_sizes.observe(size)
        self.inference_ms.observe(elapsed_ms)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _infer_one(self, tensors: list[np.ndarray]) -> list[ClassifyResult]:
        model = self._require_model()
        probs, ms = await asyncio.to_thread(self.inference.predict, model, list(tensors))
        return model.results(probs, ms)

    async def classify_frames(
        self, frames: list[FrameRecord], topk: bool = True
    ) -> list[FrameAnswer]:
        """Classify many frames in one call: a ClassifyResult per frame, or a FrameError for
        a bad one (no exception), including the frames past ``max_call_frames`` or
        ``max_call_bytes`` (``too_many_frames``, ``too_large``).

        ``topk=False`` leaves each result's ``topk`` list out (less to serialize per frame).
        """
        model = self._require_model()
        config = self._require_config()
        # One hop to a worker thread for decoding and inference together: a hop costs as
        # much as decoding a few frames, and a stream sends hundreds of calls a second.
        results, good = await asyncio.to_thread(self._classify, model, config, frames, topk)
        if good:  # Ray metrics refuse an increment of zero
            self.frames.inc(good, tags={"outcome": "classified"})
        if len(frames) > good:
            self.frames.inc(len(frames) - good, tags={"outcome": "refused"})
        return results

    def _classify(
        self, model: LoadedModel, config: ReplicaConfig, frames: list[FrameRecord], topk: bool
    ) -> tuple[list[FrameAnswer], int]:
        """(one answer per frame, how many frames were classified) - in a worker thread."""
        limits = CallLimits(
            max_batch_size=config.max_batch_size,
            max_call_frames=config.max_call_frames,
            max_call_bytes=config.max_call_bytes,
            decode=self.limits,
        )
        return self.inference.classify(model, limits, frames, topk)

    # -- HTTP -------------------------------------------------------------------------------
    @http.post("/classify")
    async def http_classify(self, request: Request) -> JSONResponse:
        """One JPEG/PNG image, or an Arrow IPC stream of frames (returns a list)."""
        config = self._require_config()
        denied = self._authorize(request, config)
        if denied is not None:
            return denied
        # Slow uploads hold a replica slot for as long as they trickle in: HTTP gets only
        # some of the slots, so the stream's handle calls always find one.
        if self.http_ongoing >= config.http_max_ongoing_requests:
            self.errors.inc(tags={"reason": "overloaded"})
            return _error(
                503,
                "overloaded",
                f"{self.http_ongoing} HTTP requests in progress on this replica (its limit)",
                headers=RETRY_AFTER,
            )
        self.http_ongoing += 1
        stage = ["body"]
        try:
            async with asyncio.timeout(config.http_request_timeout_s):
                return await self._http_classify(request, config, stage)
        except TimeoutError:
            self.errors.inc(tags={"reason": "timeout"})
            limit = config.http_request_timeout_s
            if stage[0] == "body":
                return _error(408, "request_timeout", f"the body did not arrive within {limit}s")
            return _error(503, "timeout", f"not answered within {limit}s", headers=RETRY_AFTER)
        finally:
            self.http_ongoing -= 1

    def _authorize(self, request: Request, config: ReplicaConfig) -> JSONResponse | None:
        """None when no token is configured or the request carries it; else a 401."""
        if config.http_token_hmac is None or config.http_token_salt is None:
            return None
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            _token_mac(config.http_token_salt, presented.strip().encode()),
            config.http_token_hmac,
        ):
            return None
        self.errors.inc(tags={"reason": "unauthorized"})
        return _error(
            401,
            "unauthorized",
            "POST /classify needs the header Authorization: Bearer <serve.http_token>",
            headers={"WWW-Authenticate": 'Bearer realm="framecast"'},
        )

    async def _http_classify(
        self, request: Request, config: ReplicaConfig, stage: list[str]
    ) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        encoding = CONTENT_TYPES.get(content_type)
        if content_type != ARROW_CONTENT_TYPE and encoding is None:
            return _error(
                415,
                "unsupported_format",
                f"content-type {content_type or '(none)'} is not image/jpeg, image/png "
                f"or {ARROW_CONTENT_TYPE}",
            )
        body = await _read_body(request)
        if isinstance(body, JSONResponse):
            self.errors.inc(tags={"reason": "too_large"})
            return body
        stage[0] = "work"
        if encoding is None:  # Arrow
            try:
                frames = await asyncio.to_thread(_decode_arrow, body, config.max_call_frames)
            except FrameSchemaError as error:
                reason = getattr(error, "reason", "bad_arrow")  # FrameLimitError has one
                self.errors.inc(tags={"reason": reason})
                return _error(_STATUS_BY_REASON.get(reason, 400), reason, str(error))
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
        model = self._require_model()
        try:
            tensor = await asyncio.to_thread(
                _image_input, body, encoding, self.limits, model.runtime.input_hwc
            )
        except FrameDecodeError as error:
            self.errors.inc(tags={"reason": error.reason})
            self.frames.inc(tags={"outcome": "refused"})
            return _error(_STATUS_BY_REASON.get(error.reason, 400), error.reason, error.detail)
        result = await self._infer_one(tensor)
        self.frames.inc(tags={"outcome": "classified"})
        return JSONResponse(result.to_json())

    @http.get("/healthz")
    def healthz(self) -> JSONResponse:
        """Liveness plus the health sample (the model on a fixed input, as at load)."""
        try:
            self.check_health()
        except (RuntimeError, ValueError, ArtifactError) as error:
            return JSONResponse({"status": "unhealthy", "detail": str(error)}, status_code=503)
        model = self._require_model()
        answer: dict[str, Any] = {
            "status": "ok",
            "model": model.info,
            "input": list(model.runtime.input_hwc),
        }
        if self.config is not None:
            answer["http"] = {
                "ongoing": self.http_ongoing,
                "limit": self.config.http_max_ongoing_requests,
            }
        if self.update_refused is not None:
            answer["update_refused"] = self.update_refused
        return JSONResponse(answer)

    @http.get("/openapi.json", include_in_schema=False)
    def openapi(self) -> JSONResponse:
        """The OpenAPI document, when serve.http_docs is on."""
        if self.config is None or not self.config.http_docs:
            return _error(404, "not_found", "/openapi.json is off (serve.http_docs)")
        return JSONResponse(http.openapi())

    @http.get("/docs", include_in_schema=False)
    def docs(self, request: Request) -> Response:
        """Swagger UI, when serve.http_docs is on."""
        if self.config is None or not self.config.http_docs:
            return _error(404, "not_found", "/docs is off (serve.http_docs)")
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="framecast")


class AppArgs(BaseModel):
    """The ``args`` of the Serve config: which artifact, and the serving knobs."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: str = Field(description="Artifact directory (or s3://, gs://, file:// URI).")
    serve: ServeSettings = Field(default_factory=ServeSettings)
    storage: StorageSettings | None = Field(
        default=None, description="Object-store settings for the replicas (unset: their env's)."
    )


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
                "upscale_delay_s": settings.upscale_delay_s,
                "downscale_delay_s": settings.downscale_delay_s,
            }
        }
    )
    if settings.autoscale_on == "lag" and "autoscaling_config" in scaling:
        from serving.autoscale import policy_config

        scaling["autoscaling_config"]["policy"] = policy_config(settings)
    if settings.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = settings.max_replicas_per_node
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
    location = parsed.artifact_dir if is_uri(parsed.artifact_dir) else str(artifact_dir)
    # Verified here too: a Serve config update (`serve deploy`, a RayService) whose args name
    # another artifact builds the app before Serve replaces any replica, so a tampered one
    # fails the build (DEPLOY_FAILED, with the reason) and the running version keeps serving.
    verify_location(location, parsed.storage)  # an object store's objects are streamed, not kept
    token = settings.http_token
    if token is None and os.environ.get(TOKEN_ENV):
        # A Serve config file (RayService) leaves the token out of its args, which show in
        # `serve config`: the builder's environment gives it (a Kubernetes Secret).
        token = ServeSettings.model_validate({"http_token": os.environ[TOKEN_ENV]}).http_token
    salt, mac = token_verifier(token.get_secret_value()) if token is not None else (None, None)
    user_config = ReplicaConfig(
        artifact_dir=location,
        max_batch_size=settings.max_batch_size,
        batch_wait_timeout_s=settings.batch_wait_timeout_s,
        gpu_precision=settings.gpu_precision,
        niceness=settings.replica_niceness,
        max_call_frames=settings.max_call_frames,
        max_call_bytes=settings.max_call_bytes,
        http_request_timeout_s=settings.http_request_timeout_s,
        http_max_ongoing_requests=settings.http_concurrency,
        http_docs=settings.http_docs,
        http_token_salt=salt,
        http_token_hmac=mac,
    )
    return Classifier.options(  # type: ignore[attr-defined]
        **deployment_options(settings), user_config=user_config.model_dump()
    ).bind(parsed.storage)
