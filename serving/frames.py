"""The frame record: the Arrow IPC form of frames (DESIGN contract), as the model server reads it.

It lives in serving (the lowest layer) because replicas decode frames; streams re-exports it.

One Kafka message holds one or more rows of::

    stream_id: string, frame_index: int64, captured_at_ns: int64,
    encoding: string (jpeg|png|raw), height: int32, width: int32, channels: int8,
    data: binary, label: int32 (nullable ground truth)

with the header ``content-type: application/vnd.apache.arrow.stream``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
ENCODINGS = ("jpeg", "png", "raw")

FRAME_SCHEMA = pa.schema(
    [
        pa.field("stream_id", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("captured_at_ns", pa.int64(), nullable=False),
        pa.field("encoding", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("channels", pa.int8(), nullable=False),
        pa.field("data", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
    ]
)


class FrameSchemaError(ValueError):
    """A message does not hold frames in the frame schema."""


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One video frame and its metadata."""

    stream_id: str
    frame_index: int
    captured_at_ns: int
    encoding: str
    height: int
    width: int
    channels: int
    data: bytes
    label: int | None = None


def encode_frames(frames: Sequence[FrameRecord]) -> bytes:
    """Serialize frames as one Arrow IPC stream (one record batch)."""
    columns = {name: [getattr(f, name) for f in frames] for name in FRAME_SCHEMA.names}
    batch = pa.RecordBatch.from_pydict(columns, schema=FRAME_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, FRAME_SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode_frames(payload: bytes) -> list[FrameRecord]:
    """Parse an Arrow IPC stream of frames; raise FrameSchemaError on anything else."""
    if not payload:
        raise FrameSchemaError("empty message value")
    try:
        table = pa.ipc.open_stream(payload).read_all()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as error:
        raise FrameSchemaError(f"not an Arrow IPC stream: {error}") from None
    if not table.schema.equals(FRAME_SCHEMA, check_metadata=False):
        missing = [n for n in FRAME_SCHEMA.names if n not in table.schema.names]
        raise FrameSchemaError(
            "Arrow schema does not match the frame schema"
            + (f" (missing: {', '.join(missing)})" if missing else f": got {table.schema}")
        )
    return [FrameRecord(**row) for row in table.to_pylist()]
