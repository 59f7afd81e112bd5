"""The label record (DESIGN contract): one JSON object per input frame on the labels topic.

Writers build plain dicts with :func:`label_record` (fast, on the hot path); readers and tests
validate with :class:`LabelRecord`. ``status`` is framecast's addition: ``ok`` for a classified
frame, ``dropped_deadline`` for a frame that was too old to matter (its class fields are null).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from serving.results import ClassifyResult


class SourceRef(BaseModel):
    """Where the frame came from; at-least-once output deduplicates on all four fields."""

    model_config = ConfigDict(extra="forbid")

    topic: str
    partition: int
    offset: int
    row: int = 0


class LabelRecord(BaseModel):
    """A label as consumers of the labels topic read it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    stream_id: str
    frame_index: int
    source: SourceRef
    status: Literal["ok", "dropped_deadline"] = "ok"
    class_id: int | None
    label: str | None
    score: float | None
    model: dict[str, Any] | None
    captured_at_ns: int
    labeled_at_ns: int
    timings_ms: dict[str, float]
    ground_truth: int | None


def label_model(model: dict[str, Any]) -> dict[str, Any]:
    """The fields of a result's model that a label carries."""
    return {k: model[k] for k in ("name", "version", "sha256")}


def label_record(
    *,
    stream_id: str,
    frame_index: int,
    topic: str,
    partition: int,
    offset: int,
    row: int,
    result: ClassifyResult | None,
    captured_at_ns: int,
    labeled_at_ns: int,
    timings_ms: dict[str, float],
    ground_truth: int | None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The label dict for one frame; result None means dropped for its deadline. ``model``:
    the result's model fields as :func:`label_model` gives them, when the caller has them."""
    return {
        "stream_id": stream_id,
        "frame_index": frame_index,
        "source": {"topic": topic, "partition": partition, "offset": offset, "row": row},
        "status": "ok" if result is not None else "dropped_deadline",
        "class_id": result.class_id if result else None,
        "label": result.label if result else None,
        "score": result.score if result else None,
        "model": (model or label_model(result.model)) if result else None,
        "captured_at_ns": captured_at_ns,
        "labeled_at_ns": labeled_at_ns,
        "timings_ms": timings_ms,
        "ground_truth": ground_truth,
    }


def encode_label(record: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON for the wire (orjson: a label per frame, thousands per second)."""
    return orjson.dumps(record)
