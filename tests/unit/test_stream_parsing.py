"""parse_message: every message becomes frames or dead letters; nothing a producer sends raises."""

from __future__ import annotations

import pyarrow as pa
import pytest

from serving.frames import ARROW_CONTENT_TYPE, FRAME_SCHEMA, FrameRecord, encode_frames
from streams.parsing import Item, ParseLimits, Source, parse_message

ARROW = [("content-type", ARROW_CONTENT_TYPE.encode())]
NOW = 1_800_000_000_000_000_000
LIMITS = ParseLimits()


def source(timestamp_ns: int | None = NOW, key: bytes | None = b"cam-1") -> Source:
    return Source("frames", 3, 42, key, NOW + 1_000_000, timestamp_ns)


def frame(index: int = 0, stream: str = "cam-1", captured: int = NOW, **kw: object) -> FrameRecord:
    values: dict[str, object] = {
        "stream_id": stream, "frame_index": index, "captured_at_ns": captured,
        "encoding": "raw", "height": 1, "width": 1, "channels": 1, "data": b"\x07",
        "label": 3,
    }
    values.update(kw)
    return FrameRecord(**values)  # type: ignore[arg-type]


def reasons(items: list[Item]) -> list[str | None]:
    return [i.reason for i in items]


def test_an_arrow_message_of_good_frames_gives_one_item_per_row() -> None:
    frames = [frame(i) for i in range(3)]
    items = parse_message(encode_frames(frames), ARROW, source(), LIMITS)
    assert [i.frame for i in items] == frames
    assert [i.row for i in items] == [0, 1, 2]
    assert all(i.classifiable and i.reference_ns == NOW for i in items)
    assert items[0].value is None  # a row of a larger message: encoded alone if it fails


def _batch_with(column: int, array: pa.Array) -> bytes:
    rows = [dict(zip(FRAME_SCHEMA.names, frame(i).row(), strict=True)) for i in range(3)]
    good = pa.RecordBatch.from_pylist(rows, schema=FRAME_SCHEMA)
    columns = list(good.columns)
    columns[column] = array
    batch = pa.RecordBatch.from_arrays(columns, schema=FRAME_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, FRAME_SCHEMA) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_a_row_whose_stream_id_is_not_utf8_is_a_dead_letter_and_the_others_are_frames() -> None:
    ids = pa.array(["cam-1", "cam-2", "cam-3"], pa.string())
    offsets = ids.buffers()[1]
    broken = pa.Array.from_buffers(
        pa.string(), 3, [None, offsets, pa.py_buffer(b"cam-1\xff\xfem-2cam-3")]
    )
    items = parse_message(_batch_with(0, broken), ARROW, source(), LIMITS)
    assert reasons(items) == [None, "bad_value", None]
    assert items[1].row == 1 and "UTF-8" in items[1].detail
    # The dead letter holds the bad row alone, as a one-row Arrow stream.
    assert pa.ipc.open_stream(items[1].value).read_all().num_rows == 1


def test_nulls_in_non_nullable_columns_are_dead_letters_per_row() -> None:
    indices = pa.array([0, None, 2], pa.int64())
    items = parse_message(_batch_with(1, indices), ARROW, source(), LIMITS)
    assert reasons(items) == [None, "bad_value", None]
    assert "frame_index is null" in items[1].detail


def test_a_message_with_more_rows_than_the_limit_is_one_dead_letter() -> None:
    limits = ParseLimits(max_message_frames=2)
    items = parse_message(encode_frames([frame(i) for i in range(3)]), ARROW, source(), limits)
    assert reasons(items) == ["too_many_frames"]


def test_long_stream_ids_never_reach_a_label() -> None:
    long_id = "x" * 300
    items = parse_message(encode_frames([frame(stream=long_id)]), ARROW, source(), LIMITS)
    assert reasons(items) == ["stream_id_too_long"]
    bare = [("content-type", b"image/png"), ("stream_id", long_id.encode()),
            ("frame_index", b"1"), ("captured_at_ns", str(NOW).encode())]
    assert reasons(parse_message(b"png", bare, source(), LIMITS)) == ["stream_id_too_long"]


def test_frames_over_the_frame_limit_go_to_the_dlq_without_a_serve_call() -> None:
    limits = ParseLimits(max_frame_bytes=10)
    items = parse_message(encode_frames([frame(data=b"x" * 11)]), ARROW, source(), limits)
    assert reasons(items) == ["too_large"] and not items[0].classifiable


def bare(**headers: bytes | None) -> list[tuple[str, bytes | None]]:
    base: dict[str, bytes | None] = {
        "content-type": b"image/jpeg",
        "stream_id": b"cam-9",
        "frame_index": b"7",
        "captured_at_ns": str(NOW).encode(),
    }
    base.update(headers)
    return [(k, v) for k, v in base.items() if v != b"(absent)"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"frame_index": b"99999999999999999999999"}, "bad_headers"),  # over int64
        ({"frame_index": b"-1"}, "bad_headers"),
        ({"frame_index": b"seven"}, "bad_headers"),
        ({"frame_index": None}, "bad_headers"),  # a header without a value
        ({"captured_at_ns": b"1e18"}, "bad_headers"),
        ({"label": b"4294967296"}, "bad_headers"),  # over int32
        ({"stream_id": b"\xff\xfe"}, "bad_headers"),
        ({"content-type": b"text/plain"}, "unsupported_content_type"),
    ],
)
def test_malformed_bare_image_headers_are_dead_letters(
    headers: dict[str, bytes | None], reason: str
) -> None:
    assert reasons(parse_message(b"jpeg", bare(**headers), source(), LIMITS)) == [reason]


def test_content_types_match_case_insensitively_with_parameters_ignored() -> None:
    items = parse_message(b"jpeg", bare(**{"content-type": b"Image/JPEG; q=0.9"}), source(), LIMITS)
    assert reasons(items) == [None] and items[0].frame is not None
    assert items[0].frame.encoding == "jpeg" and items[0].frame.stream_id == "cam-9"
    upper = [("Content-Type", ARROW_CONTENT_TYPE.upper().encode())]
    assert reasons(parse_message(encode_frames([frame()]), upper, source(), LIMITS)) == [None]


def test_a_bare_image_without_stream_id_takes_the_key() -> None:
    items = parse_message(b"jpeg", bare(stream_id=b"(absent)"), source(key=b"door-2"), LIMITS)
    assert items[0].frame is not None and items[0].frame.stream_id == "door-2"


def test_empty_and_garbage_values_are_dead_letters() -> None:
    assert reasons(parse_message(None, None, source(), LIMITS)) == ["empty_value"]
    assert reasons(parse_message(b"\x00" * 50, ARROW, source(), LIMITS)) == ["bad_arrow"]


def test_a_capture_time_in_the_future_is_not_trusted() -> None:
    ahead = NOW + 3_600 * 10**9
    (item,) = parse_message(encode_frames([frame(captured=ahead)]), ARROW, source(), LIMITS)
    assert item.reason is None
    assert item.reference_ns == NOW  # latency from Kafka's timestamp, never negative
    assert item.clock_skew_ms == pytest.approx(3_600_000)


def test_a_capture_time_years_ago_is_not_trusted_but_an_hour_late_frame_is() -> None:
    years = NOW - 5 * 365 * 86_400 * 10**9
    (old,) = parse_message(encode_frames([frame(captured=years)]), ARROW, source(), LIMITS)
    assert old.reference_ns == NOW and old.clock_skew_ms is not None
    late = NOW - 1_800 * 10**9
    (held,) = parse_message(encode_frames([frame(captured=late)]), ARROW, source(), LIMITS)
    assert held.reference_ns == late and held.clock_skew_ms is None


def test_the_deadline_uses_the_trusted_time() -> None:
    late = NOW - 10 * 10**9
    (dropped,) = parse_message(encode_frames([frame(captured=late)]), ARROW, source(), LIMITS,
                               deadline_ms=1000)
    assert dropped.dropped and not dropped.classifiable
    # A camera clock an hour ahead cannot dodge the deadline: Kafka's time counts.
    ahead = NOW + 3_600 * 10**9
    stale = Source("frames", 0, 1, b"k", NOW + 5 * 10**9, NOW)
    (skewed,) = parse_message(encode_frames([frame(captured=ahead)]), ARROW, stale, LIMITS,
                              deadline_ms=1000)
    assert skewed.dropped
