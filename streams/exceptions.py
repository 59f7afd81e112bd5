"""Errors raised by framecast.streams.

The root, :class:`StreamsError`, derives from the project root ``FramecastError``
(serving/exceptions.py); errors marked ``*`` are also ``UserError``s: the user's input or
configuration is at fault, not framecast::

    FramecastError
    └── StreamsError
        ├── KafkaConnectionError    the cluster cannot be reached or refuses our credentials
        ├── KafkaAdminError         the cluster refused an admin request (``code``: its error)
        ├── TopicSpecError*         a declarative topic spec is invalid or cannot be applied
        ├── SourceError*            a frame source cannot be opened or read (dataset, video)
        └── ProducerError           frames could not be produced (undelivered messages)
            └── ProducerOptionError*   the producer options are inconsistent

Frames that are not in the frame schema raise ``serving.exceptions.FrameSchemaError`` (the
frame schema is defined in serving); the stream classifier dead-letters them.
"""

from serving.exceptions import FramecastError, UserError


class StreamsError(FramecastError):
    """Root of every error raised by framecast.streams."""


class KafkaConnectionError(StreamsError):
    """The Kafka cluster could not be reached, or it refused the connection."""


class KafkaAdminError(StreamsError):
    """The cluster refused an admin request; ``code`` is Kafka's error name
    (``TOPIC_AUTHORIZATION_FAILED``, ``UNKNOWN_TOPIC_OR_PART``, ...)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class TopicSpecError(StreamsError, UserError):
    """A topic spec is invalid, or the cluster refused to apply it."""


class SourceError(StreamsError, UserError):
    """A frame source cannot be opened or read (missing dataset, bad video file)."""


class ProducerError(StreamsError):
    """Frames could not be produced: a message was refused or not delivered."""


class ProducerOptionError(ProducerError, UserError):
    """The producer options are inconsistent (the message lists every problem)."""
