"""Errors raised by framecast.streams.

StreamsError
├── KafkaConnectionError   the cluster cannot be reached or refuses our credentials
└── TopicSpecError         a declarative topic spec is invalid or cannot be applied
"""


class StreamsError(Exception):
    """Root of every error raised by framecast.streams."""


class KafkaConnectionError(StreamsError):
    """The Kafka cluster could not be reached, or it refused the connection."""


class TopicSpecError(StreamsError):
    """A topic spec is invalid, or the cluster refused to apply it."""
