"""Property-based fuzzing of parse_message (issue 17): whatever a producer sends - Arrow
messages of random types, nulls, lengths and compression, mutated or truncated streams,
random bytes, random header sets - it returns frames or dead letters with a documented
reason, and never raises. The DLQ record and the label of every item can be built too.

The example budget is fixed and the examples derandomized, so CI runs the same inputs each
time (~10 s on the 2-core machine).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.frames import ARROW_CONTENT_TYPE, FRAME_SCHEMA
from serving.results import ClassifyResult
from streams.output import Output
from streams.parsing import Item, ParseLimits, Source, parse_message

# The reasons streams/parsing.py documents (its module docstring's table).
REASONS = {
    "empty_value",
    "unsupported_content_type",
    "bad_arrow",
    "too_many_frames",
    "too_large",
    "bad_value",
    "stream_id_too_long",
    "bad_headers",
}
NOW = 1_800_000_000_000_000_000
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ----------------------------------------------------------------------------------

# The defaults, or tiny limits that every message hits.
limits = st.one_of(
    st.just(ParseLimits()),
    st.just(ParseLimits()),
    st.builds(
        ParseLimits,
        max_message_frames=st.sampled_from([1, 3, 4096]),
        max_decoded_bytes=st.sampled_from([64, 4096, 64 * 1024 * 1024]),
        max_frame_bytes=st.sampled_from([1, 100, 8 * 1024 * 1024]),
        max_stream_id_bytes=st.sampled_from([1, 8, 256]),
        max_clock_skew_ms=st.sampled_from([1.0, 5_000.0]),
        max_capture_delay_s=st.sampled_from([0.001, 3_600.0]),
    ),
)
sources = st.builds(
    Source,
    topic=st.just("frames"),
    partition=st.integers(0, 5),
    offset=st.integers(0, 2**40),
    key=st.none() | st.binary(max_size=300),
    consumed_ns=st.just(NOW),
    timestamp_ns=st.one_of(
        st.none(), st.just(NOW - 10**6), st.integers(NOW - 10**13, NOW + 10**13)
    ),
)
INT64 = st.integers(-(2**63), 2**63 - 1)
# Strings as raw UTF-8 or not: a string column is built from these bytes, unchecked.
STRING_BYTES = st.one_of(
    st.text(max_size=20).map(str.encode),
    st.binary(max_size=20),
    st.sampled_from([b"\xff\xfe", b"cam-\xc3", b"\xed\xa0\x80", b"x" * 300]),
)


def _string_column(values: list[bytes | None]) -> pa.Array:
    """A string array over raw bytes (not necessarily UTF-8), nulls where None."""
    offsets, data, valid = [0], b"", []
    for v in values:
        data += v or b""
        offsets.append(len(data))
        valid.append(v is not None)
    mask = pa.array(valid, pa.bool_()).buffers()[1] if not all(valid) else None
    return pa.Array.from_buffers(
        pa.string(),
        len(values),
        [mask, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]), pa.py_buffer(data)],
        null_count=valid.count(False),
    )


def _values(type_: pa.DataType, n: int, wild: bool = True) -> st.SearchStrategy[Any]:
    """n values of a type: with ``wild``, nulls and any value of the type; else none of
    those (stream ids UTF-8, numbers non-negative, times near now)."""
    if not wild:
        if type_ == pa.string():
            item: st.SearchStrategy[Any] = st.sampled_from(["cam-1", "raw", "κάμερα", "x" * 300])
        elif type_ == pa.int64():
            item = st.integers(0, 2**40) | st.integers(NOW - 10**12, NOW + 10**10)
        elif type_ in (pa.int32(), pa.int8()):
            item = st.integers(0, 9)
        else:
            item = st.binary(max_size=50)
        return st.lists(item, min_size=n, max_size=n).map(lambda vs: pa.array(vs, type_))
    if type_ == pa.string():
        return st.lists(st.none() | STRING_BYTES, min_size=n, max_size=n).map(_string_column)
    if type_ == pa.binary():
        item = st.binary(max_size=200)
    elif type_ == pa.int64():
        item = INT64
    elif type_ == pa.int32():
        item = st.integers(-(2**31), 2**31 - 1)
    elif type_ == pa.int8():
        item = st.integers(-128, 127)
    elif type_ == pa.float64():
        item = st.floats(allow_nan=True)
    else:
        item = st.booleans()
    return st.lists(st.none() | item, min_size=n, max_size=n).map(lambda vs: pa.array(vs, type_))


@st.composite
def frame_batches(draw: st.DrawFn, n: int) -> pa.RecordBatch:
    """A batch in the frame schema (nullability flags included) with random values: nulls
    anywhere, strings that are not UTF-8, negative numbers, big data - in none, one or
    every column."""
    wild = draw(st.sampled_from(["none", "one", "one", "all"]))
    which = draw(st.integers(0, len(FRAME_SCHEMA) - 1))
    columns = [
        draw(_values(f.type, n, wild == "all" or (wild == "one" and i == which)))
        for i, f in enumerate(FRAME_SCHEMA)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=FRAME_SCHEMA)


OTHER_TYPES = [
    pa.int8(),
    pa.int32(),
    pa.int64(),
    pa.float64(),
    pa.bool_(),
    pa.string(),
    pa.binary(),
]


@st.composite
def other_batches(draw: st.DrawFn, n: int) -> pa.RecordBatch:
    """A batch of random fields: the frame schema's names with other types, nullability or
    order, and names of its own."""
    names = draw(
        st.lists(st.sampled_from([*FRAME_SCHEMA.names, "pixels", ""]), min_size=1, max_size=10)
    )
    fields = [
        pa.field(name, draw(st.sampled_from(OTHER_TYPES)), nullable=draw(st.booleans()))
        for name in names
    ]
    columns = [draw(_values(f.type, n)) for f in fields]
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


@st.composite
def arrow_messages(draw: st.DrawFn) -> bytes:
    """An Arrow IPC stream of 0-3 batches, maybe compressed, maybe cut or with bytes flipped."""
    n = draw(st.integers(0, 6))
    batch = draw(frame_batches(n) if draw(st.booleans()) else other_batches(n))
    compression = draw(st.sampled_from([None, "lz4", "zstd"]))
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        for _ in range(draw(st.integers(0, 3))):
            writer.write_batch(batch)
    payload = bytearray(sink.getvalue().to_pybytes())
    mutation = draw(st.sampled_from(["none", "none", "cut", "flip", "append"]))
    if mutation == "cut" and payload:
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    elif mutation == "flip" and payload:
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(payload) - 1))
            payload[at] = draw(st.integers(0, 255))
    elif mutation == "append":
        payload += draw(st.binary(min_size=1, max_size=64))
    return bytes(payload)


HEADER_NAMES = ["content-type", "stream_id", "frame_index", "captured_at_ns", "label"]
CONTENT_TYPES = [
    ARROW_CONTENT_TYPE,
    "image/jpeg",
    "image/png",
    "image/jpg",
    "IMAGE/JPEG; charset=binary",
    " Application/Vnd.Apache.Arrow.Stream ;v=1",
    "text/plain",
    "",
]
HEADER_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from([s.encode() for s in CONTENT_TYPES]),
    st.integers(-(2**70), 2**70).map(lambda i: str(i).encode()),
    st.sampled_from([b"", b" 7 ", b"-0", b"1e9", b"\xff", "٣".encode(), b"9" * 40]),
)
headers = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(HEADER_NAMES),
            st.sampled_from(HEADER_NAMES).map(str.upper),
            st.text(max_size=12),
        ),
        HEADER_VALUES,
    ),
    max_size=8,
)


# -- properties ----------------------------------------------------------------------------------


class _Sent:
    """A producer that keeps what it is given (these tests build the records, no broker)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes, Any]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, headers: Any) -> None:
        self.records.append((topic, key, value, headers))


def _output() -> tuple[Output, _Sent]:
    sent = _Sent()
    output = Output(
        sent,  # type: ignore[arg-type]
        labels_topic="labels",
        dlq_topic="dlq",
        latency_topic="latency",
        dlq_max_value_bytes=1000,
        transactional=False,
    )
    return output, sent


RESULT = ClassifyResult(1, "Trouser", 0.9, {"name": "m", "version": "v1", "sha256": "0" * 64}, 1.0)


def _check(items: list[Item], limits_: ParseLimits, source: Source) -> None:
    assert items, "a message must give at least one item"
    output, sent = _output()
    for item in items:
        assert item.source is source
        if item.reason is not None:
            assert item.reason in REASONS, item.reason
            output.dead_letter(item)
            topic, _key, value, record_headers = sent.records[-1]
            named = dict(record_headers)
            assert topic == "dlq" and named["error.reason"] == item.reason.encode()
            assert named["source.row"] == str(item.row).encode()
            assert len(value) <= 1000
            continue
        frame = item.frame
        assert frame is not None
        assert len(frame.stream_id.encode()) <= limits_.max_stream_id_bytes
        assert frame.frame_index >= 0 and frame.captured_at_ns >= 0
        assert len(frame.data) <= limits_.max_frame_bytes
        # The clock policy: latency is measured from a trusted capture time, or Kafka's.
        if item.clock_skew_ms is None:
            assert item.reference_ns == frame.captured_at_ns
        else:
            assert item.reference_ns == (source.timestamp_ns or source.consumed_ns)
        record = output.label(item, None if item.dropped else RESULT, NOW, NOW + 5_000_000)
        assert record["timings_ms"]["end_to_end"] >= 0
    rows = [i.row for i in items]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)


@FUZZ
@given(
    value=arrow_messages(),
    extra_headers=headers,
    limits_=limits,
    source=sources,
    deadline_ms=st.none() | st.sampled_from([1.0, 1000.0]),
)
def test_any_arrow_message_becomes_frames_or_dead_letters_with_a_documented_reason(
    value: bytes,
    extra_headers: list[tuple[str, bytes | None]],
    limits_: ParseLimits,
    source: Source,
    deadline_ms: float | None,
) -> None:
    message_headers = [("content-type", ARROW_CONTENT_TYPE.encode()), *extra_headers]
    items = parse_message(value, message_headers, source, limits_, deadline_ms)
    _check(items, limits_, source)


@FUZZ
@given(
    value=st.one_of(
        st.none(),
        st.binary(max_size=300),
        st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"ARROW1"]),
    ),
    message_headers=st.none() | headers,
    limits_=limits,
    source=sources,
)
def test_any_bytes_and_headers_become_frames_or_dead_letters_with_a_documented_reason(
    value: bytes | None,
    message_headers: list[tuple[str, bytes | None]] | None,
    limits_: ParseLimits,
    source: Source,
) -> None:
    items = parse_message(value, message_headers, source, limits_, 1000.0)
    _check(items, limits_, source)


@FUZZ
@given(
    content_type=st.sampled_from(["image/jpeg", "Image/PNG; q=1", "IMAGE/JPG"]),
    stream_id=st.none() | st.binary(max_size=300),
    frame_index=HEADER_VALUES,
    captured_at_ns=HEADER_VALUES,
    label=HEADER_VALUES,
    duplicate=st.booleans(),
    limits_=limits,
    source=sources,
)
def test_bare_image_headers_are_checked_not_trusted(
    content_type: str,
    stream_id: bytes | None,
    frame_index: bytes | None,
    captured_at_ns: bytes | None,
    label: bytes | None,
    duplicate: bool,
    limits_: ParseLimits,
    source: Source,
) -> None:
    """A bare image with random values for each header it needs (or none): a frame whose
    numbers fit their columns, or ``bad_headers``/``stream_id_too_long``."""
    named = {
        "stream_id": stream_id,
        "frame_index": frame_index,
        "captured_at_ns": captured_at_ns,
        "label": label,
    }
    message_headers: list[tuple[str, bytes | None]] = [("content-type", content_type.encode())]
    message_headers += [(k, v) for k, v in named.items() if v is not None]
    if duplicate:  # the last of two headers of one name wins, whatever its case
        message_headers += [(k.upper(), b"1") for k, v in named.items() if v is not None]
    items = parse_message(b"\xff\xd8 image", message_headers, source, limits_)
    _check(items, limits_, source)
    (item,) = items
    assert item.reason in (None, "bad_headers", "stream_id_too_long", "too_large")
    if item.reason is None:
        assert item.frame is not None
        assert 0 <= item.frame.frame_index < 2**63 and 0 <= item.frame.captured_at_ns < 2**63
        assert item.frame.label is None or -(2**31) <= item.frame.label < 2**31
