"""Typed Ray Serve settings: replicas, batching, autoscaling and backpressure."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_TOKEN_CHARS = 16


class ServeSettings(BaseSettings):
    """How the model is served: replicas, batching, autoscaling, HTTP endpoint."""

    # hide_input_in_errors: an invalid http_token must not be echoed in the error.
    model_config = SettingsConfigDict(
        env_prefix="FRAMECAST_SERVE_", extra="forbid", hide_input_in_errors=True
    )

    app_name: str = Field(default="framecast", min_length=1, description="Serve application.")
    http_host: str = Field(default="127.0.0.1", description="Host the Serve HTTP proxy binds.")
    http_port: int = Field(default=8000, ge=1, le=65535, description="Serve HTTP port.")
    route_prefix: str = Field(default="/", pattern=r"^/", description="Route prefix of the app.")
    min_replicas: PositiveInt = Field(default=1, description="Autoscaling lower bound.")
    max_replicas: PositiveInt = Field(default=2, description="Autoscaling upper bound.")
    target_ongoing_requests: PositiveFloat = Field(
        default=2.0, description="Autoscaling target of ongoing requests per replica."
    )
    max_ongoing_requests: PositiveInt = Field(
        default=8, description="Requests a replica runs at once before queueing."
    )
    upscale_delay_s: NonNegativeFloat = Field(
        default=5.0, description="Autoscaling: seconds a scale-up must be wanted before it is made."
    )
    downscale_delay_s: NonNegativeFloat = Field(
        default=30.0,
        description="Autoscaling: seconds a scale-down must be wanted before it is made.",
    )
    autoscale_on: Literal["requests", "lag"] = Field(
        default="requests",
        description="What replicas scale on: 'requests' (Serve's ongoing-requests policy) or "
        "'lag' (serving.autoscale: the classifiers' consumer-group lag on the frames topic "
        "and the age of the oldest unlabelled frame).",
    )
    lag_bootstrap_servers: str | None = Field(
        default=None,
        description="autoscale_on=lag: Kafka the Serve controller reads the lag from "
        "(the CLI fills in the stack's). Never credentials: a SASL password reaches the "
        "controller as FRAMECAST_KAFKA_SASL_PASSWORD in its environment.",
    )
    lag_group: str | None = Field(
        default=None, description="autoscale_on=lag: the classifiers' consumer group."
    )
    lag_topic: str | None = Field(
        default=None, description="autoscale_on=lag: the frames topic they consume."
    )
    lag_target_per_replica: PositiveInt = Field(
        default=2000,
        description="autoscale_on=lag: lag one replica is worth, in Kafka messages (frames "
        "when each message holds one; an Arrow message of N frames counts once).",
    )
    lag_target_age_s: PositiveFloat = Field(
        default=5.0,
        description="autoscale_on=lag: past this age of the oldest unlabelled frame, one "
        "more replica is wanted even when the lag alone would not ask for it.",
    )
    lag_poll_interval_s: PositiveFloat = Field(
        default=1.0, description="autoscale_on=lag: how often the controller reads the lag."
    )
    lag_stale_s: PositiveFloat = Field(
        default=15.0,
        description="autoscale_on=lag: with no lag read for this long (Kafka down), the "
        "replica count is held.",
    )
    max_queued_requests: int = Field(
        default=64,
        ge=-1,
        description="Queued requests before 503 / BackPressureError (-1 = no limit).",
    )
    max_batch_size: PositiveInt = Field(default=64, description="@serve.batch max_batch_size.")
    batch_wait_timeout_s: NonNegativeFloat = Field(
        default=0.005, description="@serve.batch batch_wait_timeout_s."
    )
    access_log: bool = Field(
        default=False,
        description="Ray Serve's per-request access log in the replicas (a log line per call: "
        "off by default, a stream makes hundreds of calls a second).",
    )
    handle_transport: Literal["grpc", "actor"] = Field(
        default="grpc",
        description="How the stream classifier's handle calls reach replicas: 'grpc' (straight "
        "to the replica's gRPC server, pickled both ways: about half the CPU per call of "
        "'actor'; a call with over 3 MiB of frames goes as an actor call) or 'actor' (Ray "
        "actor calls, results by reference).",
    )
    replica_niceness: int | None = Field(
        default=0,
        ge=-20,
        le=19,
        description="Scheduling niceness of every replica thread (None = Ray's, which starts "
        "workers at 15). Replicas are on the stream's critical path: at 15 a busy box runs "
        "them last. Lowering it needs CAP_SYS_NICE (root here; in a pod, the capability or "
        "RAY_worker_niceness=0); without, replicas warn and keep Ray's.",
    )
    max_call_frames: PositiveInt = Field(
        default=4096,
        description="Frames one classify_frames call (or Arrow HTTP body) may hold: the frames "
        "beyond are answered FrameError('too_many_frames'), not decoded.",
    )
    max_call_bytes: PositiveInt = Field(
        default=64 * 1024 * 1024,
        description="Encoded frame bytes one call may hold: the frames past the total are "
        "answered FrameError('too_large'), not decoded. Frames are decoded and run "
        "max_batch_size at a time, so decoded tensors never exceed one such chunk.",
    )
    http_token: SecretStr | None = Field(
        default=None,
        description="Bearer token POST /classify requires (Authorization: Bearer <token>); "
        "unset = open. Replicas get only a salted HMAC-SHA256 of it (docs/serving.md); use a "
        "random token (secrets.token_urlsafe(32)). GET /healthz stays open.",
    )
    http_request_timeout_s: PositiveFloat = Field(
        default=30.0,
        description="An HTTP request's time in a replica, body upload included: past it the "
        "upload is answered 408, the work 503 with Retry-After. The Serve proxy's "
        "http_options.request_timeout_s is set 5 s above, as a backstop.",
    )
    http_max_ongoing_requests: PositiveInt | None = Field(
        default=None,
        description="HTTP requests a replica runs at once; more are answered 503 with "
        "Retry-After, so slow uploads cannot take the slots of the stream's handle calls. "
        "Default: half of max_ongoing_requests (at least 1). At most max_ongoing_requests.",
    )
    http_docs: bool = Field(default=False, description="Serve /docs and /openapi.json (off: 404).")
    num_cpus: PositiveFloat = Field(default=1.0, description="CPUs per replica.")
    max_replicas_per_node: PositiveInt | None = Field(
        default=None,
        description="At most this many replicas on one Ray node (a hard cap: a replica that "
        "fits nowhere waits for a node). Unset: Serve's SPREAD, which spreads a deploy and a "
        "scale-up over the nodes but may put a replacement beside another replica.",
    )
    num_gpus: NonNegativeFloat = Field(
        default=0.0, description="GPUs per replica (> 0 serves the SavedModel on GPU)."
    )
    gpu_precision: Literal["float16", "float32"] = Field(
        default="float16",
        description="SavedModel precision on GPU replicas (float16: auto mixed precision).",
    )

    @field_validator("http_token", mode="wrap")
    @classmethod
    def _validate_token(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        # Here rather than min_length: its message counts "items".
        token = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(token, str) and len(token) < MIN_TOKEN_CHARS:
            raise PydanticCustomError(
                "token_too_short", f"must be at least {MIN_TOKEN_CHARS} characters"
            )
        return handler(value)

    @model_validator(mode="after")
    def _validate_replicas(self) -> ServeSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if (
            self.http_max_ongoing_requests is not None
            and self.http_max_ongoing_requests > self.max_ongoing_requests
        ):
            raise ValueError(
                f"http_max_ongoing_requests ({self.http_max_ongoing_requests}) must be <= "
                f"max_ongoing_requests ({self.max_ongoing_requests})"
            )
        return self

    @property
    def http_concurrency(self) -> int:
        """HTTP requests a replica runs at once (the rest of max_ongoing_requests is left to
        handle calls)."""
        if self.http_max_ongoing_requests is not None:
            return self.http_max_ongoing_requests
        return max(1, self.max_ongoing_requests // 2)

    @property
    def http_url(self) -> str:
        """Base URL of the Serve HTTP proxy."""
        return f"http://{self.http_host}:{self.http_port}"


class StorageSettings(BaseSettings):
    """Where artifacts named by URI (``s3://``, ``gs://``, ``file://``) are read and written.

    Credentials come from here - ``FRAMECAST_STORAGE_*`` or, when those are unset, the
    standard AWS variables - never from the command line or the URI. They are SecretStr
    (masked in ``status --json``, reprs and logs) and reach Serve replicas as the
    deployment's constructor argument, never as user_config or runtime_env env_vars (both
    are shown by ``serve status`` / the Ray dashboard); see docs/contracts.md. Unset, each
    process uses its own environment (instance roles, pod identity, the AWS variables).
    """

    model_config = SettingsConfigDict(
        env_prefix="FRAMECAST_STORAGE_", extra="forbid", populate_by_name=True,
        hide_input_in_errors=True, loc_by_alias=False,
    )

    endpoint_override: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "FRAMECAST_STORAGE_ENDPOINT_OVERRIDE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
        ),
        description="S3-compatible endpoint (http(s)://host:port: MinIO, Ceph, a test server); "
        "unset = AWS.",
    )
    region: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "FRAMECAST_STORAGE_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"
        ),
        description="S3 region (unset: the SDK's default chain).",
    )
    access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("FRAMECAST_STORAGE_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
        description="S3 access key id (or AWS_ACCESS_KEY_ID).",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("FRAMECAST_STORAGE_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
        description="S3 secret access key (or AWS_SECRET_ACCESS_KEY).",
    )
    session_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("FRAMECAST_STORAGE_SESSION_TOKEN", "AWS_SESSION_TOKEN"),
        description="Temporary session token (or AWS_SESSION_TOKEN).",
    )
    gcs_anonymous: bool = Field(
        default=False, description="Read gs:// without credentials (public buckets)."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where each replica keeps fetched artifacts, per URI and manifest sha256 "
        "(default: $XDG_CACHE_HOME/framecast/artifacts or ~/.cache/framecast/artifacts on the "
        "replica's node).",
    )

    @field_validator("endpoint_override")
    @classmethod
    def _validate_endpoint(cls, endpoint: str | None) -> str | None:
        if endpoint is None or "://" not in endpoint:
            return endpoint
        scheme = endpoint.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        return endpoint

    @model_validator(mode="after")
    def _validate_keys(self) -> StorageSettings:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("access_key and secret_key go together: set both or neither")
        if self.session_token is not None and self.access_key is None:
            raise ValueError("session_token needs access_key and secret_key")
        return self

    @property
    def configured(self) -> bool:
        """True when anything is set (so replicas get these settings, not their own env's)."""
        return bool(self.model_dump(exclude_defaults=True))
