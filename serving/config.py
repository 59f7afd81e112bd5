"""Typed Ray Serve settings: replicas, batching, autoscaling and backpressure."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """How the model is served: replicas, batching, autoscaling, HTTP endpoint."""

    model_config = SettingsConfigDict(env_prefix="FRAMECAST_SERVE_", extra="forbid")

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
    num_cpus: PositiveFloat = Field(default=1.0, description="CPUs per replica.")
    num_gpus: NonNegativeFloat = Field(
        default=0.0, description="GPUs per replica (> 0 serves the SavedModel on GPU)."
    )
    gpu_precision: Literal["float16", "float32"] = Field(
        default="float16",
        description="SavedModel precision on GPU replicas (float16: auto mixed precision).",
    )

    @model_validator(mode="after")
    def _validate_replicas(self) -> ServeSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self

    @property
    def http_url(self) -> str:
        """Base URL of the Serve HTTP proxy."""
        return f"http://{self.http_host}:{self.http_port}"
