"""Typed Kafka connection and topic settings (pydantic-settings).

Every field can be set by a ``FRAMECAST_KAFKA_*`` / ``FRAMECAST_TOPICS_*`` environment
variable or by a CLI flag; secrets are ``SecretStr`` and never appear in reprs or logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, PositiveInt, SecretStr, model_validator
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
