"""From a consumed Kafka message to frames and dead letters: a pure function, no I/O.

:func:`parse_message` turns one message of the frames topic (an Arrow IPC stream of rows, or
a bare JPEG/PNG with its metadata in headers - DESIGN's two forms) into one :class:`Item` per
frame, or per row that is not a frame, or a single item for a message that holds no frames
at all. Whatever the bytes and headers are, it returns; nothing a producer can send makes it
raise. Every refusal has a stable ``reason`` (the DLQ's ``error.reason``):

===========================  ==============================================================
``empty_value``              no value
``unsupported_content_type`` neither Arrow nor ``image/jpeg``/``image/png``
``bad_arrow``                not an Arrow stream in the frame schema
``too_many_frames``          more rows than ``max_message_frames``
``too_large``                inflates past ``max_decoded_bytes``, or a frame's data is
                             over ``max_frame_bytes`` (refused before it reaches a replica)
``bad_value``                one row: a null in a non-nullable column, a string that is not
                             UTF-8, a negative index or time
``stream_id_too_long``       over ``max_stream_id_bytes`` (it is copied into every label)
``bad_headers``              a bare image's headers missing, not integers, out of range, or
                             not UTF-8
===========================  ==============================================================

Clock policy: ``captured_at_ns`` is the camera's clock, checked against the time Kafka
stamped on the message (or, without one, the time it was consumed). It is trusted from
``max_capture_delay_s`` before that time (a camera may hold frames that long, e.g. through a
network outage: they are really that late) to ``max_clock_skew_ms`` after it (no frame is
captured after it was sent; a little skew between clocks is allowed). Outside that range the
frame is still labelled, but its latency and deadline are measured from Kafka's timestamp
instead, and ``Item.clock_skew_ms`` says how far the camera's time was off
(``timings_ms.clock_skew`` in its label). A wrong camera clock can therefore neither give
negative latencies, nor dodge a deadline, nor poison the aggregates with years.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

from serving.frames import (
    ARROW_CONTENT_TYPE,
    FrameLimitError,
    FrameRecord,
    FrameSchemaError,
    RowError,
    decode_frame_rows,
)

BARE_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
_INT64 = (0, 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """What one message may ask of the classifier (see docs/reliability.md)."""

    max_message_frames: int = 4096
    max_decoded_bytes: int = 64 * 1024 * 1024
    max_frame_bytes: int = 8 * 1024 * 1024
    max_stream_id_bytes: int = 256
    max_clock_skew_ms: float = 5_000.0
    max_capture_delay_s: float = 3_600.0


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message was read, and when."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    consumed_ns: int
    timestamp_ns: int | None  # Kafka's (CreateTime or LogAppendTime), None if absent


@dataclass(slots=True)
class Item:
    """One frame of a message, or one dead letter, in consumption order."""

    source: Source
    row: int
    frame: FrameRecord | None = None
    reason: str | None = None  # set: this item goes to the DLQ
    detail: str = ""
    error_class: str = ""
    # The DLQ record's value: the message, or the row alone; None for a frame of a message
    # of many rows (the frame alone is encoded if it ever goes to the DLQ).
    value: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    reference_ns: int = 0  # the capture time latency is measured from (see the clock policy)
    clock_skew_ms: float | None = None  # set when captured_at_ns was not trusted
    dropped: bool = False  # too old for the deadline: labelled as dropped, not classified

    @property
    def broker_ms(self) -> float:
        """Time from Kafka's timestamp to consumption (0 without a timestamp)."""
        ts = self.source.timestamp_ns
        return max(0.0, (self.source.consumed_ns - ts) / 1e6) if ts else 0.0

    @property
    def classifiable(self) -> bool:
        """Whether this item's frame goes to Serve."""
        return self.frame is not None and self.reason is None and not self.dropped


def kafka_timestamp_ns(kind: int, timestamp_ms: int) -> int | None:
    """A message's Kafka timestamp in ns (None where the client says there is none)."""
    if kind == TIMESTAMP_NOT_AVAILABLE or timestamp_ms <= 0:
        return None
    return timestamp_ms * 1_000_000


def parse_message(
    value: bytes | None,
    headers: list[tuple[str, bytes | None]] | None,
    source: Source,
    limits: ParseLimits,
    deadline_ms: float | None = None,
    headers_error: str | None = None,
) -> list[Item]:
    """The frames of one message, and a dead letter for each part that is not a frame.

    ``headers_error``: the client could not read the message's headers (confluent-kafka
    raises on a header key that is not UTF-8); the message is a ``bad_headers`` dead letter.
    """
    raw_headers = [(k, v if v is not None else b"") for k, v in headers or []]
    named = {k.lower(): v for k, v in raw_headers}

    def dead(reason: str, detail: str, error_class: str = "FrameSchemaError") -> list[Item]:
        return [Item(source, 0, None, reason, detail, error_class, value, raw_headers)]

    if headers_error is not None:
        return dead("bad_headers", f"the headers cannot be read: {headers_error[:200]}")
    if not value:
        return dead("empty_value", "the message has no value")
    content_type = named.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
    if content_type == ARROW_CONTENT_TYPE:
        try:
            rows = decode_frame_rows(
                value,
                max_decoded_bytes=limits.max_decoded_bytes,
                max_rows=limits.max_message_frames,
                max_stream_id_bytes=limits.max_stream_id_bytes,
            )
        except FrameLimitError as error:
            return dead(error.reason, str(error))
        except FrameSchemaError as error:
            return dead("bad_arrow", str(error))
        if not rows:
            return dead("bad_arrow", "the Arrow stream holds no frames")
        items = []
        one = len(rows) == 1
        check = _FrameCheck(source, limits, deadline_ms)
        for r, row in enumerate(rows):
            if isinstance(row, RowError):
                items.append(
                    Item(source, r, None, row.reason, row.detail, "FrameSchemaError",
                         value if one else row.value, raw_headers)
                )
            else:
                items.append(check.item(r, row, value if one else None, raw_headers))
        return items
    encoding = BARE_TYPES.get(content_type)
    if encoding is None:
        return dead(
            "unsupported_content_type",
            f"content-type {content_type[:100] or '(none)'} is not {ARROW_CONTENT_TYPE}, "
            "image/jpeg or image/png",
        )
    try:
        frame = _bare_frame(value, encoding, named, source.key, limits)
    except _BadHeaders as error:
        return dead(error.reason, str(error))
    return [_FrameCheck(source, limits, deadline_ms).item(0, frame, value, raw_headers)]


class _BadHeaders(ValueError):
    def __init__(self, detail: str, reason: str = "bad_headers") -> None:
        super().__init__(detail)
        self.reason = reason


def _int_header(named: dict[str, bytes], name: str, bounds: tuple[int, int]) -> int:
    raw = named.get(name)
    if raw is None:
        raise _BadHeaders(f"bare image needs header {name} (an integer)")
    text = raw[:32].decode("ascii", errors="replace").strip()
    if len(raw) > 32 or not text.lstrip("-").isdigit():
        raise _BadHeaders(f"header {name} is not an integer: {text[:32]!r}")
    number = int(text)
    if not bounds[0] <= number <= bounds[1]:
        raise _BadHeaders(f"header {name}={number} is outside {bounds[0]}..{bounds[1]}")
    return number


def _bare_frame(
    value: bytes,
    encoding: str,
    named: dict[str, bytes],
    key: bytes | None,
    limits: ParseLimits,
) -> FrameRecord:
    raw_id = named.get("stream_id", key or b"")
    if len(raw_id) > limits.max_stream_id_bytes:
        raise _BadHeaders(
            f"stream_id of {len(raw_id)} bytes > {limits.max_stream_id_bytes}",
            "stream_id_too_long",
        )
    try:
        stream_id = raw_id.decode()
    except UnicodeDecodeError:
        raise _BadHeaders("header stream_id (or the key) is not UTF-8") from None
    label = named.get("label")
    return FrameRecord(
        stream_id=stream_id,
        frame_index=_int_header(named, "frame_index", _INT64),
        captured_at_ns=_int_header(named, "captured_at_ns", _INT64),
        encoding=encoding,
        height=0,
        width=0,
        channels=0,
        data=value,
        label=_int_header(named, "label", _INT32) if label not in (None, b"") else None,
    )


class _FrameCheck:
    """The per-frame checks of one message, with what they compare against worked out once
    (thousands of frames a second pass through here)."""

    __slots__ = ("deadline_before", "high", "low", "max_bytes", "reference", "source")

    def __init__(self, source: Source, limits: ParseLimits, deadline_ms: float | None) -> None:
        self.source = source
        self.reference = source.timestamp_ns or source.consumed_ns
        self.low = self.reference - int(limits.max_capture_delay_s * 1e9)
        self.high = self.reference + int(limits.max_clock_skew_ms * 1e6)
        self.max_bytes = limits.max_frame_bytes
        self.deadline_before = (
            source.consumed_ns - int(deadline_ms * 1e6) if deadline_ms is not None else None
        )

    def item(
        self, row: int, frame: FrameRecord, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Item:
        item = Item(self.source, row, frame, value=value, headers=headers)
        if len(frame.data) > self.max_bytes:
            item.reason, item.error_class = "too_large", "FrameDecodeError"
            item.detail = f"frame data of {len(frame.data)} bytes > {self.max_bytes}"
            return item
        captured = frame.captured_at_ns
        if self.low <= captured <= self.high:
            item.reference_ns = captured
        else:
            item.reference_ns = self.reference
            item.clock_skew_ms = round((captured - self.reference) / 1e6, 3)
        if self.deadline_before is not None and item.reference_ns < self.deadline_before:
            item.dropped = True
        return item
