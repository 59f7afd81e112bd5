"""The frame record: the Arrow IPC form of frames (DESIGN contract), as the model server reads it.

It lives in serving (the lowest layer) because replicas decode frames; streams re-exports it.

One Kafka message holds one or more rows of::

    stream_id: string, frame_index: int64, captured_at_ns: int64,
    encoding: string (jpeg|png|raw), height: int32, width: int32, channels: int8,
    data: binary, label: int32 (nullable ground truth)

with the header ``content-type: application/vnd.apache.arrow.stream``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from serving.exceptions import FrameSchemaError as FrameSchemaError  # re-exported

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
# What one message may decode to. Arrow IPC may compress its buffers (LZ4/ZSTD): 8 kB on the
# wire can declare 200 MB, so the declared sizes are checked before anything is inflated.
MAX_DECODED_BYTES = 64 * 1024 * 1024
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


class FrameLimitError(FrameSchemaError):
    """A message over a limit: ``reason`` is ``too_large`` or ``too_many_frames``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


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

    def row(self) -> tuple[str, int, int, str, int, int, int, bytes, int | None]:
        """The fields in FRAME_SCHEMA order."""
        return (
            self.stream_id,
            self.frame_index,
            self.captured_at_ns,
            self.encoding,
            self.height,
            self.width,
            self.channels,
            self.data,
            self.label,
        )

    def __reduce__(self) -> tuple[type[FrameRecord], tuple[object, ...]]:
        # Plain positional pickling: several times faster than a slots dataclass's default
        # (docs/BENCHMARKS.md), and thousands of frames a second cross to replicas this way.
        return (FrameRecord, self.row())


_FRAME_STRUCT = pa.struct(list(FRAME_SCHEMA))


def encode_frames(frames: Sequence[FrameRecord]) -> bytes:
    """Serialize frames as one Arrow IPC stream (one record batch)."""
    # Rows into one struct array: a third of the cost of nine per-column conversions, which
    # is most of the cost of a camera's one-frame message.
    rows = [f.row() for f in frames]
    batch = pa.RecordBatch.from_struct_array(pa.array(rows, type=_FRAME_STRUCT))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, FRAME_SCHEMA) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def warm_up() -> None:
    """Encode and decode one frame, so that the first real one does not pay for what pyarrow
    loads on first use (a camera's first frame was that late, and the cameras then caught up
    in a burst; docs/BENCHMARKS.md)."""
    frame = FrameRecord("warm-up", 0, 0, "raw", 1, 1, 1, b"\x00", None)
    decode_frames(encode_frames([frame]))


def _flat_table(buf: bytes, pos: int) -> list[int | None]:
    """Absolute positions of a flatbuffer table's fields (None = absent)."""
    vtable = pos - struct.unpack_from("<i", buf, pos)[0]
    size = struct.unpack_from("<H", buf, vtable)[0]
    offsets = struct.unpack_from(f"<{(size - 4) // 2}H", buf, vtable + 4)
    return [pos + o if o else None for o in offsets]


def _field(fields: list[int | None], index: int) -> int | None:
    return fields[index] if index < len(fields) else None


def _declared_bytes(metadata: bytes, body: memoryview) -> int:
    """Bytes a record/dictionary batch message inflates to, read from its metadata (Arrow
    Message.fbs) without decompressing: a compressed buffer starts with its int64 length."""
    message = _flat_table(metadata, struct.unpack_from("<I", metadata, 0)[0])
    header_at = _field(message, 2)  # Message.header
    if header_at is None:
        return len(body)
    header = _flat_table(metadata, header_at + struct.unpack_from("<I", metadata, header_at)[0])
    if struct.unpack_from("<B", metadata, _field(message, 1) or 0)[0] == 2:  # DictionaryBatch
        data_at = _field(header, 1)
        if data_at is None:
            return len(body)
        header = _flat_table(metadata, data_at + struct.unpack_from("<I", metadata, data_at)[0])
    buffers_at, compression_at = _field(header, 2), _field(header, 3)
    if compression_at is None or buffers_at is None:
        return len(body)  # uncompressed: the body is what it decodes to
    vector = buffers_at + struct.unpack_from("<I", metadata, buffers_at)[0]
    total = 0
    for k in range(struct.unpack_from("<I", metadata, vector)[0]):
        offset, length = struct.unpack_from("<qq", metadata, vector + 4 + 16 * k)
        if length >= 8:
            declared = struct.unpack_from("<q", body, offset)[0]
            total += declared if declared >= 0 else length - 8
    return total


def check_decoded_size(payload: bytes, limit: int = MAX_DECODED_BYTES) -> None:
    """Refuse an Arrow IPC stream that would inflate past ``limit`` bytes (FrameSchemaError)."""
    total = 0
    try:
        reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(payload))
        for message in reader:
            if message.type in ("record batch", "dictionary batch"):
                body = memoryview(message.body if message.body is not None else b"")
                total += _declared_bytes(message.metadata.to_pybytes(), body)
    except (pa.ArrowInvalid, OSError, struct.error, IndexError) as error:
        raise FrameSchemaError(f"not an Arrow IPC stream: {error}") from None
    if total > limit:
        raise FrameLimitError(
            "too_large",
            f"the Arrow stream declares {total} decoded bytes, over the limit of {limit} "
            "(a compressed decompression bomb?): refused before decoding"
        )


@dataclass(frozen=True, slots=True)
class RowError:
    """A row of an Arrow message that is not a frame (the other rows may be)."""

    row: int
    reason: str  # a stable word: bad_value, stream_id_too_long
    detail: str
    value: bytes  # the row alone, as a one-row Arrow IPC stream (for a dead-letter record)


DecodedRow = FrameRecord | RowError
_NOT_NULL = [i for i, f in enumerate(FRAME_SCHEMA) if not f.nullable]
_STRINGS = [i for i, f in enumerate(FRAME_SCHEMA) if f.type == pa.string()]
_STREAM_ID, _FRAME_INDEX, _CAPTURED_AT = 0, 1, 2


def decode_frame_rows(
    payload: bytes,
    max_decoded_bytes: int = MAX_DECODED_BYTES,
    max_rows: int | None = None,
    max_stream_id_bytes: int | None = None,
) -> list[DecodedRow]:
    """Parse an Arrow IPC stream of frames into one frame, or one RowError, per row.

    FrameSchemaError (the whole message is refused) when it is not an Arrow stream in the
    frame schema, would inflate past ``max_decoded_bytes`` (checked before anything is
    inflated), or holds more than ``max_rows`` rows. Row by row, values that the schema's
    types let through but the contract does not - nulls in non-nullable columns, strings
    that are not UTF-8, a negative index or time, a stream id longer than
    ``max_stream_id_bytes`` - make a RowError for that row only.
    """
    if not payload:
        raise FrameSchemaError("empty message value")
    check_decoded_size(payload, max_decoded_bytes)
    try:
        reader = pa.ipc.open_stream(payload)
        schema = reader.schema
        if not schema.equals(FRAME_SCHEMA, check_metadata=False):
            missing = [n for n in FRAME_SCHEMA.names if n not in schema.names]
            raise FrameSchemaError(
                "Arrow schema does not match the frame schema"
                + (f" (missing: {', '.join(missing)})" if missing else f": got {schema}")
            )
        out: list[DecodedRow] = []
        for batch in reader:  # columns in FRAME_SCHEMA order, as the check above ensured
            if max_rows is not None and len(out) + batch.num_rows > max_rows:
                raise FrameLimitError(
                    "too_many_frames",
                    f"the message holds more than {max_rows} frames (the per-message limit)",
                )
            out += _batch_rows(batch, len(out), max_stream_id_bytes)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as error:
        raise FrameSchemaError(f"not an Arrow IPC stream: {error}") from None
    return out


def _batch_rows(
    batch: pa.RecordBatch, first_row: int, max_stream_id_bytes: int | None
) -> list[DecodedRow]:
    columns = batch.columns
    clean = all(columns[i].null_count == 0 for i in _NOT_NULL)
    if clean:
        try:
            for i in _STRINGS:
                columns[i].validate(full=True)
        except pa.ArrowInvalid:
            clean = False
    if clean:  # the common case: every row is a frame unless a value is out of range
        values = [column.to_pylist() for column in columns]
        rows: list[DecodedRow] = [FrameRecord(*row) for row in zip(*values, strict=True)]
    else:
        rows = [_one_row(batch, r) for r in range(batch.num_rows)]
    for r, row in enumerate(rows):
        if isinstance(row, FrameRecord):
            why = _out_of_range(row, max_stream_id_bytes)
            if why is not None:
                rows[r] = RowError(first_row + r, why[0], why[1], _row_ipc(batch, r))
        else:
            rows[r] = RowError(first_row + r, row.reason, row.detail, row.value)
    return rows


def _one_row(batch: pa.RecordBatch, r: int) -> DecodedRow:
    values = []
    for i, column in enumerate(batch.columns):
        name = FRAME_SCHEMA.names[i]
        scalar = column[r]
        if i in _NOT_NULL and not scalar.is_valid:
            return RowError(r, "bad_value", f"{name} is null", _row_ipc(batch, r))
        try:
            values.append(scalar.as_py())
        except UnicodeDecodeError:
            return RowError(r, "bad_value", f"{name} is not UTF-8", _row_ipc(batch, r))
    return FrameRecord(*values)


def _out_of_range(frame: FrameRecord, max_stream_id_bytes: int | None) -> tuple[str, str] | None:
    if max_stream_id_bytes is not None and len(frame.stream_id) > max_stream_id_bytes // 4 and (
        len(frame.stream_id.encode()) > max_stream_id_bytes
    ):
        return (
            "stream_id_too_long",
            f"stream_id of {len(frame.stream_id.encode())} bytes > {max_stream_id_bytes}",
        )
    if frame.frame_index < 0:
        return "bad_value", f"frame_index {frame.frame_index} < 0"
    if frame.captured_at_ns < 0:
        return "bad_value", f"captured_at_ns {frame.captured_at_ns} < 0"
    return None


def _row_ipc(batch: pa.RecordBatch, r: int) -> bytes:
    """One row as an Arrow IPC stream: its buffers are copied as they are (no UTF-8 check)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, FRAME_SCHEMA) as writer:
        writer.write_batch(batch.slice(r, 1))
    return bytes(sink.getvalue().to_pybytes())


def decode_frames(payload: bytes, max_decoded_bytes: int = MAX_DECODED_BYTES) -> list[FrameRecord]:
    """Parse an Arrow IPC stream of frames; raise FrameSchemaError on anything else,
    including a single row that is not a frame (see :func:`decode_frame_rows`)."""
    frames: list[FrameRecord] = []
    for row in decode_frame_rows(payload, max_decoded_bytes):
        if isinstance(row, RowError):
            raise FrameSchemaError(f"row {row.row}: {row.detail}")
        frames.append(row)
    return frames
