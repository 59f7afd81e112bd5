"""Typed settings of streams (pydantic-settings): the Kafka connection, the topics, and the
stream classifier.

Every field can be set by a ``FRAMECAST_KAFKA_*`` / ``FRAMECAST_TOPICS_*`` /
``FRAMECAST_STREAM_*`` environment variable or by a CLI flag; secrets are ``SecretStr`` and
never appear in reprs or logs.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
REDACTED = "**********"


class _RedactSecrets(logging.Filter):
    """Replaces every secret handed to a Kafka client with asterisks in log records.

    librdkafka masks its sensitive properties itself; this also covers what it quotes from
    elsewhere (a broker's message, an error string), on the loggers it is handed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(secret in message for secret in self.secrets):
                for secret in self.secrets:
                    message = message.replace(secret, REDACTED)
                record.msg, record.args = message, None
        return True


_REDACT = _RedactSecrets()


def redact_secrets(logger: logging.Logger) -> logging.Logger:
    """``logger`` with every Kafka secret framecast has handed out masked in its records
    (for the loggers given to librdkafka clients)."""
    logger.addFilter(_REDACT)  # once: Filterer.addFilter skips a filter it holds
    return logger


SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(BaseSettings):
    """How framecast connects to Kafka: the embedded broker or an existing cluster."""

    model_config = SettingsConfigDict(
        env_prefix="FRAMECAST_KAFKA_", extra="forbid", populate_by_name=True
    )

    bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "bootstrap_servers", "FRAMECAST_KAFKA_BOOTSTRAP", "FRAMECAST_KAFKA_BOOTSTRAP_SERVERS"
        ),
        description="host:port[,host:port] of an existing cluster; unset = the embedded broker.",
    )
    embedded_port: int = Field(
        default=9092, ge=1, le=65535, description="Port of the embedded broker's client listener."
    )
    embedded_heap_mb: PositiveInt = Field(
        default=512, description="Maximum JVM heap of the embedded broker, in MiB."
    )
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT", description="Kafka security.protocol."
    )
    sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="SASL mechanism, required with SASL_* protocols."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle (PEM) to verify brokers.")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (PEM).")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (PEM).")
    ssl_password: SecretStr | None = Field(
        default=None, description="Password of the client private key."
    )
    ssl_check_hostname: bool = Field(
        default=True, description="Verify that the broker certificate matches its host name."
    )
    client_id: str = Field(default="framecast", min_length=1, description="Kafka client.id.")
    request_timeout_ms: PositiveInt = Field(
        default=30_000, description="Kafka client request timeout."
    )

    @model_validator(mode="after")
    def _validate_security(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_"):
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"security_protocol={self.security_protocol} needs {', '.join(missing)}"
                )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self

    @property
    def uses_embedded_broker(self) -> bool:
        """True when no external cluster is configured."""
        return self.bootstrap_servers is None

    def rdkafka_config(self, bootstrap_servers: str | None = None) -> dict[str, Any]:
        """librdkafka properties of this connection, for every confluent-kafka client
        (producers, consumers, admin). Holds the secrets in clear: never log it."""
        servers = bootstrap_servers or self.bootstrap_servers
        if servers is None:
            servers = f"127.0.0.1:{self.embedded_port}"
        config: dict[str, Any] = {
            "bootstrap.servers": servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.lower(),
            "socket.timeout.ms": self.request_timeout_ms,
        }
        if self.security_protocol.startswith("SASL_"):
            assert self.sasl_password is not None  # noqa: S101 - guaranteed by the validator
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none"
            )
            files = {
                "ssl.ca.location": self.ssl_cafile,
                "ssl.certificate.location": self.ssl_certfile,
                "ssl.key.location": self.ssl_keyfile,
            }
            config.update({key: str(path) for key, path in files.items() if path is not None})
            if self.ssl_password is not None:
                config["ssl.key.password"] = self.ssl_password.get_secret_value()
        _REDACT.secrets.update(
            secret.get_secret_value()
            for secret in (self.sasl_password, self.ssl_password)
            if secret is not None and secret.get_secret_value()
        )
        return config


class TopicSettings(BaseSettings):
    """Topic names and the defaults applied when framecast creates them."""

    model_config = SettingsConfigDict(env_prefix="FRAMECAST_TOPICS_", extra="forbid")

    frames: str = Field(default="frames", min_length=1, description="Input frames topic.")
    labels: str = Field(default="labels", min_length=1, description="Output labels topic.")
    latency: str = Field(default="latency", min_length=1, description="Latency aggregates topic.")
    dlq: str = Field(default="frames.dlq", min_length=1, description="Dead-letter topic.")
    partitions: PositiveInt = Field(default=4, description="Partitions of created topics.")
    replication_factor: PositiveInt = Field(
        default=1, description="Replication factor of created topics."
    )
    retention_ms: int = Field(
        default=24 * 3600 * 1000,
        ge=-1,
        description="retention.ms of created topics (-1 = forever).",
    )
    max_message_bytes: PositiveInt = Field(
        default=8 * 1024 * 1024, description="max.message.bytes of the frames and DLQ topics."
    )


# The DLQ topic takes what the frames topic takes (TopicSettings.max_message_bytes); a DLQ
# record adds headers to the original value, so values are copied up to that less 64 KiB.
DLQ_HEADROOM_BYTES = 64 * 1024


def dlq_value_limit(max_message_bytes: int) -> int:
    """The largest value a DLQ record copies, for a DLQ topic of this max.message.bytes."""
    return max(1, max_message_bytes - DLQ_HEADROOM_BYTES)


Guarantee = Literal["at-least-once", "exactly-once"]
_TOPIC_DEFAULTS = {name: field.default for name, field in TopicSettings.model_fields.items()}


class ClassifierConfig(BaseSettings):
    """How the stream classifier consumes, batches, calls Serve and commits (the ``stream``
    section of the settings; ``FRAMECAST_STREAM_*``).

    Topic names and ``dlq_max_value_bytes`` not set here follow the ``topics`` section
    (``FramecastSettings`` fills them in); standalone, they take its defaults.
    """

    model_config = SettingsConfigDict(env_prefix="FRAMECAST_STREAM_", extra="forbid")

    frames_topic: str = Field(
        default=_TOPIC_DEFAULTS["frames"], min_length=1, description="Input frames topic."
    )
    labels_topic: str = Field(
        default=_TOPIC_DEFAULTS["labels"], min_length=1, description="Labels topic."
    )
    latency_topic: str = Field(
        default=_TOPIC_DEFAULTS["latency"], min_length=1, description="Aggregates topic."
    )
    dlq_topic: str = Field(
        default=_TOPIC_DEFAULTS["dlq"], min_length=1, description="Dead-letter topic."
    )
    group: str = Field(default="framecast", min_length=1, description="Consumer group id.")
    guarantee: Guarantee = Field(default="at-least-once", description="Processing guarantee.")
    deadline_ms: PositiveInt | None = Field(
        default=None, description="Frames older than this (capture to consume) are dropped."
    )
    max_frames: PositiveInt | None = Field(default=None, description="Stop after N frames.")
    consumer_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name in the latency aggregates and transactional id.",
    )
    max_batch_frames: PositiveInt = Field(default=256, description="Frames per Serve call.")
    max_batch_bytes: PositiveInt = Field(
        default=16 * 1024 * 1024, description="Frame data per Serve call (bytes)."
    )
    max_message_frames: PositiveInt = Field(
        default=4096, description="Rows one Arrow message may hold (more: the DLQ)."
    )
    max_message_decoded_bytes: PositiveInt = Field(
        default=64 * 1024 * 1024,
        description="Bytes one Arrow message may inflate to, checked before it is inflated.",
    )
    max_frame_bytes: PositiveInt = Field(
        default=8 * 1024 * 1024,
        description="Data of one frame (more: the DLQ, without a Serve call; the replicas' "
        "own limit is max_frame_bytes of their config).",
    )
    max_stream_id_bytes: PositiveInt = Field(
        default=256, description="Longest stream id (it is copied into every label)."
    )
    max_clock_skew_ms: PositiveFloat = Field(
        default=5_000.0,
        description="How far captured_at_ns may be ahead of Kafka's timestamp before it is "
        "not trusted: latency and deadline are then measured from Kafka's timestamp (the "
        "label gets timings_ms.clock_skew).",
    )
    max_capture_delay_s: PositiveFloat = Field(
        default=3_600.0,
        description="How far captured_at_ns may be behind Kafka's timestamp (a camera "
        "holding frames) before it is not trusted, as for max_clock_skew_ms.",
    )
    max_batch_wait_ms: NonNegativeInt = Field(
        default=0,
        description="Longest a batch waits for more frames while fewer than max_in_flight "
        "Serve calls are out (0: sent at once; the frames that arrive while max_in_flight "
        "calls are out form the next batch either way).",
    )
    max_in_flight: PositiveInt = Field(default=2, description="Serve calls outstanding at once.")
    commit_interval_ms: NonNegativeInt = Field(default=200, description="Flush+commit cadence.")
    fetch_wait_ms: NonNegativeInt = Field(
        default=10,
        description="Longest a fetch waits at the broker for data (fetch.wait.max.ms); the "
        "client fetches in the background, and a broker answers as soon as any data arrives.",
    )
    label_linger_ms: NonNegativeInt = Field(
        default=10,
        description="Producer linger for labels: fewer, larger produce requests (a commit "
        "flushes at once, so this bounds delivery delay only between commits).",
    )
    latency_window_s: PositiveFloat = Field(default=5.0, description="Aggregate period.")
    serve_timeout_s: PositiveFloat = Field(
        default=60.0, description="One Serve call's limit; past it the call is cancelled."
    )
    serve_max_attempts: PositiveInt = Field(
        default=3,
        description="Failed calls of the same frames (a replica raised, died or timed out on "
        "them) before the batch is split to isolate a bad frame; a frame alone that fails "
        "this often goes to the DLQ (replica_error).",
    )
    serve_give_up_s: PositiveFloat | None = Field(
        default=600.0,
        description="How long Serve may have no replica for us (unavailable, backpressure) "
        "before the classifier stops with an error, committing nothing past its frames "
        "(None: wait forever).",
    )
    backoff_max_s: PositiveFloat = Field(default=5.0, description="Longest retry backoff.")
    idle_exit_s: PositiveFloat | None = Field(
        default=None, description="Stop after this long without input (tests, batch jobs)."
    )
    parquet_dir: Path | None = Field(default=None, description="Also write Parquet files here.")
    topic_wait_s: PositiveFloat = Field(
        default=60.0, description="How long start-up waits for the frames topic to exist."
    )
    dlq_max_value_bytes: PositiveInt = Field(
        default=dlq_value_limit(_TOPIC_DEFAULTS["max_message_bytes"]),
        description="Largest original value copied into a DLQ record. A larger one is left "
        "out (header error.value_omitted = its size; source.* still point at it): a DLQ "
        "record its topic refuses would block every commit behind it.",
    )


    def follow_topics(self, topics: TopicSettings) -> ClassifierConfig:
        """This config with the topic names and the DLQ value limit that ``topics`` gives,
        where they were not set here."""
        given = self.model_fields_set
        update: dict[str, Any] = {
            f"{kind}_topic": getattr(topics, kind)
            for kind in ("frames", "labels", "latency", "dlq")
            if f"{kind}_topic" not in given
        }
        if "dlq_max_value_bytes" not in given:
            update["dlq_max_value_bytes"] = dlq_value_limit(topics.max_message_bytes)
        followed = self.model_copy(update=update)
        # Still "not set here": a later follow_topics (a run on topics of its own) follows too.
        object.__setattr__(followed, "__pydantic_fields_set__", set(given))
        return followed
