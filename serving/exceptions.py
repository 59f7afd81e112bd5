"""The root of every framecast error, and the errors raised by framecast.serving.

The root lives here because ``serving`` is the bottom of the import graph
(``cluster -> streams -> serving <- jobs``): every package can import it. Each package has
one root of its own under :class:`FramecastError`; an error that is the user's to fix (a bad
path, option, config, dataset or frame) also derives from :class:`UserError`::

    FramecastError                  an error framecast raises on purpose, with a message
    ├── UserError                   marker: the user's input or configuration is at fault
    ├── ServingError                framecast.serving (this module)
    │   ├── ArtifactError*          an artifact directory is missing, malformed or tampered with
    │   ├── FrameSchemaError*       a message does not hold frames in the frame schema
    │   ├── FrameDecodeError*       a frame cannot be turned into model input (has .reason)
    │   ├── DatasetNotFoundError*   the Fashion-MNIST files are in none of the places looked in
    │   ├── DatasetFormatError*     a Fashion-MNIST file is not a well-formed IDX file
    │   └── DeployError             the Serve application did not become healthy
    ├── StreamsError                framecast.streams (streams/exceptions.py)
    ├── JobsError                   framecast.jobs (jobs/exceptions.py)
    └── ClusterError                framecast.cluster (cluster/exceptions.py)

    * also a UserError

A command line catches :class:`FramecastError`, prints its message and exits non-zero; any
other exception is a bug and keeps its traceback. Some errors also keep a builtin base that
callers rely on: ``FrameSchemaError``, ``FrameDecodeError`` and ``DatasetFormatError`` are
``ValueError``s, ``DatasetNotFoundError`` is a ``FileNotFoundError``. The class names
``FrameSchemaError`` and ``FrameDecodeError`` are a contract: dead-letter records carry them
in their ``error.class`` header.
"""

from __future__ import annotations


class FramecastError(Exception):
    """Root of every error framecast raises on purpose."""


class UserError(FramecastError):
    """Marker: the user's input or configuration is at fault, not framecast (no traceback)."""


class ServingError(FramecastError):
    """Root of every error raised by framecast.serving."""


class ArtifactError(ServingError, UserError):
    """An artifact directory is missing, malformed, or does not match its manifest."""


class FrameSchemaError(ServingError, UserError, ValueError):
    """A message does not hold frames in the frame schema."""


class FrameDecodeError(ServingError, UserError, ValueError):
    """A frame could not be turned into model input; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DatasetNotFoundError(ServingError, UserError, FileNotFoundError):
    """The dataset files are in none of the places framecast looks."""


class DatasetFormatError(ServingError, UserError, ValueError):
    """A dataset file is not what its name says (bad IDX header, sizes that disagree)."""


class DeployError(ServingError):
    """The Serve application did not become healthy."""
