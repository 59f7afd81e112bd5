"""Kafka client factories that turn connection failures into clear errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from confluent_kafka import KafkaError as KafkaError_
from kafka import KafkaAdminClient
from kafka.errors import KafkaError, KafkaTimeoutError, SaslAuthenticationFailedError

from streams.config import KafkaSettings
from streams.exceptions import KafkaConnectionError

# kafka-python reports a refused SASL handshake only in a log record ("Connection lost: ..."
# from kafka.net.connection), then retries until it times out with "no broker available";
# the parent logger of its network layer is where we hear why.
_CONNECTION_LOGGER = "kafka.net"


def rdkafka_reason(error: BaseException) -> str:
    """What a confluent-kafka (librdkafka) exception says, in one line."""
    inner = error.args[0] if error.args else None
    if isinstance(inner, KafkaError_):
        return f"{inner.name()}: {inner.str()}"
    return str(error)


def rdkafka_callbacks(logger: logging.Logger) -> dict[str, Any]:
    """librdkafka client properties that route its log lines and its background errors
    (a broker down, refused credentials) to ``logger`` instead of stderr.

    librdkafka retries transient errors by itself; they are warnings, fatal ones errors.
    """

    def on_error(error: KafkaError_) -> None:
        level = logging.ERROR if error.fatal() else logging.WARNING
        logger.log(level, "kafka: %s: %s", error.name(), error.str())

    return {"error_cb": on_error, "logger": logger}


def _describe(config: dict[str, Any]) -> str:
    return f"{','.join(config['bootstrap_servers'])} ({config['security_protocol']})"


class _AuthFailures(logging.Handler):
    """Collects what kafka-python logs when a broker refuses us while connecting.

    A SCRAM broker answers wrong credentials by closing the connection, which kafka-python
    reports as "Connection lost" on a connection that had already exchanged ApiVersions
    (its broker version is known): with SASL, that is the authentication step failing.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, SaslAuthenticationFailedError):
                self.errors.append(arg)
        if record.msg == "%s: Connection lost: %s" and len(args) == 2:
            connection, error = args
            if getattr(connection, "broker_version_data", None) is not None and isinstance(
                error, BaseException
            ):
                self.errors.append(error)


@contextlib.contextmanager
def _watch_auth_failures() -> Iterator[_AuthFailures]:
    logger = logging.getLogger(_CONNECTION_LOGGER)
    handler = _AuthFailures()
    previous = logger.level
    if logger.getEffectiveLevel() > logging.ERROR:
        logger.setLevel(logging.ERROR)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def authentication_error(config: dict[str, Any], error: BaseException) -> KafkaConnectionError:
    """The error for refused credentials: who was refused, by what mechanism, never a secret."""
    user = config.get("sasl_plain_username") or "(no user)"
    mechanism = config.get("sasl_mechanism") or config["security_protocol"]
    return KafkaConnectionError(
        f"Kafka at {_describe(config)} refused the SASL authentication of user {user!r} "
        f"({mechanism}; {error}): check sasl_username and "
        "sasl_password (FRAMECAST_KAFKA_SASL_USERNAME / FRAMECAST_KAFKA_SASL_PASSWORD) "
        "and sasl_mechanism"
    )


@contextlib.contextmanager
def admin_client(
    settings: KafkaSettings, bootstrap_servers: str | None = None
) -> Iterator[KafkaAdminClient]:
    """An admin client for the configured cluster, closed on exit."""
    config = settings.client_config(bootstrap_servers)
    try:
        with _watch_auth_failures() as failures:
            admin = KafkaAdminClient(**config)
    except SaslAuthenticationFailedError as error:
        raise authentication_error(config, error) from None
    except KafkaTimeoutError:
        if failures.errors and config["security_protocol"].startswith("SASL_"):
            raise authentication_error(config, failures.errors[-1]) from None
        raise KafkaConnectionError(
            f"cannot reach Kafka at {_describe(config)}: no broker answered; is it running "
            "(`framecast up`) and are --bootstrap-servers and the security settings right?"
        ) from None
    except KafkaError as error:
        raise KafkaConnectionError(f"Kafka at {_describe(config)} refused us: {error}") from None
    try:
        yield admin
    finally:
        with contextlib.suppress(KafkaError, OSError):
            admin.close()
