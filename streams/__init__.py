"""framecast.streams — Kafka I/O: connection settings, topic specs, frame/label schemas.

This package never imports TensorFlow: consumers move bytes and metadata, and decoding
happens in the Serve replicas.
"""

from streams.config import KafkaSettings, TopicSettings
from streams.exceptions import (
    KafkaConnectionError,
    StreamsError,
    TopicSpecError,
)

__all__ = [
    "KafkaConnectionError",
    "KafkaSettings",
    "StreamsError",
    "TopicSettings",
    "TopicSpecError",
]
