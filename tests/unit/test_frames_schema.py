"""The Arrow frame record of DESIGN: round trip and clear errors."""

from __future__ import annotations

import pyarrow as pa
import pytest

from streams.frames import FRAME_SCHEMA, FrameRecord, FrameSchemaError, decode_frames, encode_frames


def _frame(i: int, label: int | None = 3) -> FrameRecord:
    return FrameRecord(
        stream_id="cam-1",
        frame_index=i,
        captured_at_ns=1_700_000_000_000 + i,
        encoding="raw",
        height=2,
        width=2,
        channels=1,
        data=bytes([i] * 4),
        label=label,
    )


def test_frames_round_trip_through_arrow_ipc() -> None:
    frames = [_frame(0), _frame(1, label=None), _frame(2)]
    assert decode_frames(encode_frames(frames)) == frames


@pytest.mark.parametrize("payload", [b"", b"\x00garbage\xff" * 10])
def test_non_arrow_payload_is_rejected(payload: bytes) -> None:
    with pytest.raises(FrameSchemaError):
        decode_frames(payload)


def test_wrong_arrow_schema_names_missing_columns() -> None:
    table = pa.table({"stream_id": ["a"], "frame_index": [1]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(FrameSchemaError, match="missing: captured_at_ns"):
        decode_frames(sink.getvalue().to_pybytes())


def test_schema_matches_design_contract() -> None:
    assert FRAME_SCHEMA.names == [
        "stream_id",
        "frame_index",
        "captured_at_ns",
        "encoding",
        "height",
        "width",
        "channels",
        "data",
        "label",
    ]
    assert FRAME_SCHEMA.field("label").nullable


def _compressed(frames: list[FrameRecord], codec: str) -> bytes:
    columns = {name: [getattr(f, name) for f in frames] for name in FRAME_SCHEMA.names}
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=codec)
    with pa.ipc.new_stream(sink, FRAME_SCHEMA, options=options) as writer:
        writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=FRAME_SCHEMA))
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressed_frames_within_the_limit_decode(codec: str) -> None:
    frames = [_frame(i) for i in range(5)]
    assert decode_frames(_compressed(frames, codec)) == frames


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_compressed_arrow_bomb_is_refused_before_inflating(codec: str) -> None:
    bomb = FrameRecord(
        stream_id="cam-1",
        frame_index=0,
        captured_at_ns=1,
        encoding="raw",
        height=2048,
        width=4096,
        channels=1,
        data=bytes(8 * 2**20),
    )
    payload = _compressed([bomb], codec)
    assert len(payload) < 2**20  # 8 MiB of zeros in well under 1 MiB on the wire
    with pytest.raises(FrameSchemaError, match=r"declares \d+ decoded bytes, over the limit"):
        decode_frames(payload, max_decoded_bytes=4 * 2**20)
