"""What a replica answers per frame: a :class:`ClassifyResult`, or a :class:`FrameError`.

``classify_frames`` answers a list with one of the two per frame, in the order of the frames
sent: a bad frame is an answer, not a failed call, so one undecodable frame never costs the
others of its batch their labels. The HTTP API writes the same objects as JSON (DESIGN's
response: ``{class_id, label, score, topk, model, inference_ms}``, or ``{error, detail}``).

Both pickle as plain tuples (``__reduce__``): thousands of results a second cross from the
replicas to the stream classifier, and a slots dataclass's default pickling costs several
times more (docs/BENCHMARKS.md). They are not frozen for the same reason (a frozen
dataclass's ``__init__`` sets each field through ``object.__setattr__``, over three times
the cost of building one); treat them as read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class ClassifyResult:
    """The model's answer for one frame."""

    class_id: int
    label: str
    score: float
    model: dict[str, Any]  # name, version, sha256, runtime, precision (shared, read-only)
    inference_ms: float  # model time of the call this frame was part of
    topk: list[dict[str, Any]] | None = None  # left out when the caller asked for topk=False
    decode_ms: float = 0.0  # this frame's decoding to model input (label timings_ms.decode)

    def to_json(self) -> dict[str, Any]:
        """The DESIGN response object (``topk`` only when it was computed)."""
        out: dict[str, Any] = {
            "class_id": self.class_id,
            "label": self.label,
            "score": self.score,
        }
        if self.topk is not None:
            out["topk"] = self.topk
        out["model"] = self.model
        out["inference_ms"] = self.inference_ms
        return out

    def __reduce__(self) -> tuple[type[ClassifyResult], tuple[Any, ...]]:
        return (
            ClassifyResult,
            (
                self.class_id,
                self.label,
                self.score,
                self.model,
                self.inference_ms,
                self.topk,
                self.decode_ms,
            ),
        )


@dataclass(slots=True)
class FrameError:
    """A frame the replica refused; ``reason`` is a stable word (DLQ ``error.reason``)."""

    reason: str
    detail: str
    error_class: str = "FrameDecodeError"  # DLQ ``error.class``

    def to_json(self) -> dict[str, Any]:
        """``{error, detail}``, as the HTTP API answers a refused frame."""
        return {"error": self.reason, "detail": self.detail}

    def __reduce__(self) -> tuple[type[FrameError], tuple[Any, ...]]:
        return (FrameError, (self.reason, self.detail, self.error_class))


FrameAnswer = ClassifyResult | FrameError
"""One frame's answer from ``classify_frames``."""
