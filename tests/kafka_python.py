"""kafka-python, the tests' independent Kafka client: what a test reads back or writes
around framecast goes through a client other than the one under test (librdkafka).

framecast itself builds librdkafka properties only (``KafkaSettings.rdkafka_config``); this
translates them, so both clients connect exactly as the settings say.
"""

from __future__ import annotations

from typing import Any

from streams.config import KafkaSettings

# librdkafka property -> kafka-python keyword argument
_RENAMED = {
    "client.id": "client_id",
    "socket.timeout.ms": "request_timeout_ms",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.username": "sasl_plain_username",
    "sasl.password": "sasl_plain_password",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_password",
}


def kafka_python_config(
    settings: KafkaSettings, bootstrap_servers: str | None = None
) -> dict[str, Any]:
    """kafka-python keyword arguments (KafkaProducer, KafkaConsumer) for these settings."""
    properties = settings.rdkafka_config(bootstrap_servers)
    config: dict[str, Any] = {
        "bootstrap_servers": properties["bootstrap.servers"].split(","),
        "security_protocol": properties["security.protocol"].upper(),
    }
    config.update({_RENAMED[k]: v for k, v in properties.items() if k in _RENAMED})
    if "ssl.endpoint.identification.algorithm" in properties:
        config["ssl_check_hostname"] = properties["ssl.endpoint.identification.algorithm"] != "none"
    return config
