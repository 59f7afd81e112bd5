"""Errors raised by framecast.cluster (the CLI and the embedded stack).

ClusterError
├── PrerequisiteError     a tool the stack needs (java, mvn) is missing
├── BrokerStartError      the embedded Kafka broker did not come up (carries its log tail)
├── PortInUseError        a port the stack needs is taken by another process
└── RayHeadError          the local Ray head did not start or stop
"""


class ClusterError(Exception):
    """Root of every error raised by framecast.cluster."""


class PrerequisiteError(ClusterError):
    """A program the embedded stack needs is not installed."""


class BrokerStartError(ClusterError):
    """The embedded Kafka broker failed to start; the message ends with its log tail."""


class PortInUseError(ClusterError):
    """A port the embedded stack wants is already bound by another process."""


class RayHeadError(ClusterError):
    """The local Ray head failed to start or to stop."""
