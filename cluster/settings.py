"""The one typed settings model of framecast.

Sources, highest precedence first: CLI flags, ``FRAMECAST_*`` environment variables
(``RAY_ADDRESS`` too), defaults. Validation happens at start-up; errors name the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from cluster.exceptions import SettingsError
from serving.config import ServeSettings, StorageSettings
from streams.config import ClassifierConfig, KafkaSettings, TopicSettings


class RaySettings(BaseSettings):
    """The Ray cluster framecast uses: a local head it starts, or an existing cluster."""

    model_config = SettingsConfigDict(
        env_prefix="FRAMECAST_RAY_", extra="forbid", populate_by_name=True
    )

    address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("address", "RAY_ADDRESS", "FRAMECAST_RAY_ADDRESS"),
        description="Address of an existing Ray cluster; unset = the local head.",
    )
    num_cpus: PositiveInt | None = Field(
        default=None, description="CPUs the local head offers (default: all cores)."
    )
    gcs_port: int = Field(default=6379, ge=1, le=65535, description="GCS port of the local head.")
    dashboard_port: int = Field(
        default=8265, ge=1, le=65535, description="Dashboard port (bound to 127.0.0.1 only)."
    )
    object_store_mb: PositiveInt = Field(
        default=512, description="Object store of the local head, in MiB."
    )
    namespace: str = Field(default="framecast", min_length=1, description="Ray namespace.")
    nodes: PositiveInt = Field(
        default=1, le=16,
        description="Nodes of the local cluster: the head plus nodes-1 worker nodes "
        "(`ray start --address`) on this machine.",
    )
    worker_num_cpus: PositiveInt | None = Field(
        default=None,
        description="CPUs each local worker node offers (default: the cores split evenly "
        "over the nodes).",
    )

    @property
    def head_num_cpus(self) -> int | None:
        """CPUs the local head offers: num_cpus, else its share when there are worker nodes."""
        if self.num_cpus is not None or self.nodes == 1:
            return self.num_cpus
        return max(1, (os.cpu_count() or 1) // self.nodes)

    @property
    def worker_cpus(self) -> int:
        """CPUs each local worker node offers."""
        if self.worker_num_cpus is not None:
            return self.worker_num_cpus
        return max(1, (os.cpu_count() or 1) // self.nodes)

    @property
    def uses_local_head(self) -> bool:
        """True when no external cluster is configured."""
        return self.address is None


class DashboardSettings(BaseSettings):
    """The live web view, ``framecast dashboard`` (``FRAMECAST_DASHBOARD_*``)."""

    model_config = SettingsConfigDict(env_prefix="FRAMECAST_DASHBOARD_", extra="forbid")

    host: str = Field(
        default="127.0.0.1", min_length=1,
        description="Address the page binds: 127.0.0.1 is this machine only.",
    )
    port: int = Field(default=8080, ge=1, le=65535, description="Port of the page.")
    token: SecretStr | None = Field(
        default=None,
        description="Access token (>= 16 characters): Authorization: Bearer, or ?token= once "
        "(then an HttpOnly cookie). Unset: no token, which is safe on 127.0.0.1 only.",
    )
    group: str = Field(
        default="framecast-dashboard", min_length=1,
        description="The dashboard's own consumer group; it never joins or commits, so it "
        "takes nothing from the classifier's group.",
    )
    update_ms: int = Field(
        default=500, ge=100, le=10_000, description="How often the page is updated (SSE)."
    )
    history_s: int = Field(
        default=300, ge=10, le=3600, description="Seconds of throughput and latency charted."
    )

    @field_validator("token")
    @classmethod
    def _long_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("the token must be at least 16 characters")
        return token


class FramecastSettings(BaseSettings):
    """Every setting of the system, in one place."""

    model_config = SettingsConfigDict(env_prefix="FRAMECAST_", extra="forbid")

    home: Path = Field(
        default=Path(".framecast"), description="State directory: pids, ports, broker data."
    )
    kafka_libs: Path | None = Field(
        default=None,
        description="Where the broker jars are cached (default: HOME/kafka/libs).",
    )
    data_dir: Path | None = Field(
        default=None, description="Extra place to look for datasets (IDX files)."
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    stream: ClassifierConfig = Field(default_factory=ClassifierConfig)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)

    @model_validator(mode="after")
    def _stream_follows_topics(self) -> FramecastSettings:
        # The classifier's topics are the ``topics`` section's unless set for it alone.
        self.stream = self.stream.follow_topics(self.topics)
        return self

    @property
    def kafka_libs_dir(self) -> Path:
        """Directory that holds the resolved broker jars."""
        return self.kafka_libs if self.kafka_libs is not None else self.home / "kafka" / "libs"

    def redacted(self) -> dict[str, Any]:
        """The effective settings as JSON-able data, with every secret masked."""
        return self.model_dump(mode="json")


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per invalid field: ``kafka.security_protocol: Input should be ...``."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"] if part != "__root__")
        where = ".".join(p for p in (prefix, location) if p) or prefix or "settings"
        lines.append(f"{where}: {item['msg']}")
    return "\n".join(lines)


def load_settings(**overrides: Any) -> FramecastSettings:
    """Build the settings from env vars plus nested ``overrides``; raise SettingsError.

    ``overrides`` maps a section (``kafka``, ``ray``, ...) to a dict of field values,
    or a top-level field to its value. ``None`` values are ignored (flag not given).
    """
    sections = {
        "kafka": KafkaSettings,
        "topics": TopicSettings,
        "ray": RaySettings,
        "serve": ServeSettings,
        "stream": ClassifierConfig,
        "dashboard": DashboardSettings,
        "storage": StorageSettings,
    }
    unknown = set(overrides) - set(sections) - set(FramecastSettings.model_fields)
    if unknown:
        raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {
        key: value for key, value in overrides.items() if key not in sections and value is not None
    }
    # Each section is built on its own so that an invalid env var is reported with
    # its section prefix (``kafka.security_protocol``), like an invalid flag.
    for key, section in sections.items():
        values = {k: v for k, v in (overrides.get(key) or {}).items() if v is not None}
        try:
            kwargs[key] = section(**values)
        except ValidationError as error:
            raise SettingsError(describe_validation_error(error, key)) from None
    try:
        return FramecastSettings(**kwargs)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None
