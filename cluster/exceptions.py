"""Errors raised by framecast.cluster (the CLI, the embedded stack, job submission).

The root, :class:`ClusterError`, derives from the project root ``FramecastError``
(serving/exceptions.py); errors marked ``*`` are also ``UserError``s: the user's input or
configuration is at fault, not framecast::

    FramecastError
    └── ClusterError
        ├── SettingsError*        a setting (flag, FRAMECAST_* variable) is invalid; names the field
        ├── PrerequisiteError     a tool the stack needs (java, mvn) is missing
        ├── BrokerStartError      the embedded Kafka broker did not come up (carries its log tail)
        ├── PortInUseError        a port the stack needs is taken by another process
        ├── RayHeadError          the local Ray head did not start or stop
        ├── SubmitError           a Ray job could not be submitted, found or followed
        │   └── SubmitOptionError*   a `submit` option, address or token is missing or unusable
        ├── ToolError             a chart-check tool could not be built, or a check failed
        └── DashboardError        the dashboard's web server did not start (its port, its host)

The ``framecast`` CLI prints any ``FramecastError`` (from any package) as ``error: ...`` and
exits non-zero; every other exception is a bug and keeps its traceback.
"""

from serving.exceptions import FramecastError, UserError


class ClusterError(FramecastError):
    """Root of every error raised by framecast.cluster."""


class SettingsError(ClusterError, UserError):
    """A setting is invalid; the message names each offending field."""


class PrerequisiteError(ClusterError):
    """A program the embedded stack needs is not installed."""


class BrokerStartError(ClusterError):
    """The embedded Kafka broker failed to start; the message ends with its log tail."""


class PortInUseError(ClusterError):
    """A port the embedded stack wants is already bound by another process."""


class RayHeadError(ClusterError):
    """The local Ray head failed to start or to stop."""


class SubmitError(ClusterError):
    """A job could not be submitted, found or followed."""


class SubmitOptionError(SubmitError, UserError):
    """A `framecast submit` option, the Jobs API address or its token is missing or unusable."""


class ToolError(ClusterError):
    """A tool of the chart checks could not be built, or a check failed."""


class DashboardError(ClusterError):
    """The dashboard's web server did not start."""
