"""Kafka client factories that turn connection failures into clear errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError, KafkaTimeoutError

from streams.config import KafkaSettings
from streams.exceptions import KafkaConnectionError


def _describe(config: dict[str, Any]) -> str:
    return f"{','.join(config['bootstrap_servers'])} ({config['security_protocol']})"


@contextlib.contextmanager
def admin_client(
    settings: KafkaSettings, bootstrap_servers: str | None = None
) -> Iterator[KafkaAdminClient]:
    """An admin client for the configured cluster, closed on exit."""
    config = settings.client_config(bootstrap_servers)
    try:
        admin = KafkaAdminClient(**config)
    except KafkaTimeoutError:
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
