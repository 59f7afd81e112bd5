"""Errors raised by framecast.jobs (training, optimization, evaluation, reports).

The root, :class:`JobsError`, derives from the project root ``FramecastError``
(serving/exceptions.py); errors marked ``*`` are also ``UserError``s: the user's options or
data are at fault, not framecast::

    FramecastError
    └── JobsError
        ├── OptionError*     an option, or a combination of options, cannot be used
        ├── DatasetError*    a dataset is unknown, missing, malformed, or does not fit the model
        └── TrainingError    a training or evaluation run failed (carries its output)

``OptionError`` and ``DatasetError`` are also ``ValueError``s: option checks run inside
pydantic validators (which turn only ``ValueError`` into a ``ValidationError``), and the sweep
records a point that tfmot cannot quantize by catching ``ValueError``. An artifact that is
missing or tampered with raises ``serving.exceptions.ArtifactError``.
"""

from serving.exceptions import FramecastError, UserError


class JobsError(FramecastError):
    """Root of every error raised by framecast.jobs."""


class OptionError(JobsError, UserError, ValueError):
    """An option (or a combination of options) cannot be used; the message names it."""


class DatasetError(JobsError, UserError, ValueError):
    """A dataset name is unknown, its files are missing or malformed, or it does not fit."""


class TrainingError(JobsError):
    """A training or evaluation run failed; the message ends with what it printed."""
