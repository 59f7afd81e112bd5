"""Bad input on the frames topic: every malformed, hostile or oversized message goes to the DLQ
with its reason and source offset, is never decoded past its limits, and never stops the stream.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from kafka.errors import MessageSizeTooLargeError
from PIL import Image

from serving.frames import ARROW_CONTENT_TYPE, FRAME_SCHEMA, FrameRecord, encode_frames
from streams.config import KafkaSettings
from tests.reliability.conftest import Record, Replicas, peak_rss_mb
from tests.streaming import (
    IMAGES,
    frame,
    labels_of,
    producer,
    read_topic,
    run_classifier,
    set_max_message_bytes,
    tally,
    topics,
)

pytestmark = pytest.mark.timeout(300)

ARROW = [("content-type", ARROW_CONTENT_TYPE.encode())]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int, rows: int | None = None) -> bytes:
    """A grayscale PNG claiming side x side pixels; its IDAT inflates to ``rows`` rows of zeros
    (all of them by default: a real decompression bomb, ~1000:1)."""
    compressor = zlib.compressobj(9)
    line = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(line) for _ in range(rows or side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def arrow_bomb(decoded_bytes: int) -> bytes:
    """One frame whose ZSTD-compressed Arrow buffers inflate to ``decoded_bytes`` of zeros."""
    columns: dict[str, list[Any]] = {
        "stream_id": ["cam-bad"],
        "frame_index": [0],
        "captured_at_ns": [1],
        "encoding": ["raw"],
        "height": [1],
        "width": [1],
        "channels": [1],
        "data": [bytes(decoded_bytes)],
        "label": [None],
    }
    batch = pa.RecordBatch.from_pydict(columns, schema=FRAME_SCHEMA)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, FRAME_SCHEMA, options=options) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.stack([IMAGES[0]] * 3, axis=2)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _wrong_schema() -> bytes:
    sink = io.BytesIO()
    table = pa.table({"stream_id": ["cam-x"], "pixels": [b"x"]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _bare(value: bytes, content_type: bytes, index: int | bytes = 0) -> dict[str, Any]:
    return {
        "value": value,
        "headers": [
            ("content-type", content_type),
            ("stream_id", b"cam-bad"),
            ("frame_index", index if isinstance(index, bytes) else str(index).encode()),
            ("captured_at_ns", b"1"),
        ],
    }


def _raw_frame(height: int, width: int, data: bytes) -> bytes:
    return encode_frames(
        [
            FrameRecord(
                stream_id="cam-bad",
                frame_index=0,
                captured_at_ns=1,
                encoding="raw",
                height=height,
                width=width,
                channels=1,
                data=data,
            )
        ]
    )


# name -> (message, the DLQ reason it must get)
MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "random bytes as JPEG": (_bare(os.urandom(500), b"image/jpeg"), "undecodable"),
    "truncated JPEG": (_bare(_jpeg()[:300], b"image/jpeg"), "undecodable"),
    "PNG bytes labelled JPEG": (
        _bare(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"image/jpeg"),
        "undecodable",
    ),
    "wrong Arrow schema": ({"value": _wrong_schema(), "headers": ARROW}, "bad_arrow"),
    "garbage as Arrow": ({"value": os.urandom(200), "headers": ARROW}, "bad_arrow"),
    "empty value": ({"value": b"", "headers": [("content-type", b"image/png")]}, "empty_value"),
    "no headers": ({"value": _jpeg(), "headers": []}, "unsupported_content_type"),
    "unknown content type": (_bare(b"hello", b"text/plain"), "unsupported_content_type"),
    "non-integer frame_index": (_bare(_jpeg(), b"image/jpeg", b"seven"), "bad_headers"),
    "missing frame headers": (
        {"value": _jpeg(), "headers": [("content-type", b"image/jpeg")]},
        "bad_headers",
    ),
    "raw frame of the wrong size": (
        {"value": _raw_frame(28, 28, b"\x00" * 100), "headers": ARROW},
        "bad_dimensions",
    ),
}


def _send_interleaved(
    kafka_settings: KafkaSettings, topic: str, bad: dict[str, tuple[dict[str, Any], str]]
) -> tuple[set[tuple[str, int]], dict[int, tuple[str, str]]]:
    """Good frame 0, bad 1, good 1, bad 2, ... good N: returns (good keys, offset -> bad)."""
    p = producer(kafka_settings, max_request_size=16 * 1024 * 1024)
    good: set[tuple[str, int]] = set()
    offsets: dict[int, tuple[str, str]] = {}
    offset = 0
    names = list(bad)
    for index in range(len(names) + 1):
        f = frame(0, index)
        p.send(topic, key=f.stream_id.encode(), value=encode_frames([f]), headers=ARROW)
        good.add((f.stream_id, index))
        offset += 1
        if index < len(names):
            message, reason = bad[names[index]]
            p.send(topic, key=b"cam-bad", **message)
            offsets[offset] = (names[index], reason)
            offset += 1
    p.flush()
    p.close()
    return good, offsets


def _check_dlq(
    kafka_settings: KafkaSettings, topic: str, dlq_topic: str, offsets: dict[int, tuple[str, str]]
) -> dict[str, str]:
    records = read_topic(kafka_settings, dlq_topic, len(offsets))
    got = {}
    for record in records:
        headers = dict(record.headers)
        assert headers["source.topic"].decode() == topic
        assert headers["source.partition"] == b"0"
        assert headers["error.class"] and headers["error.detail"]
        got[int(headers["source.offset"])] = headers["error.reason"].decode()
    assert len(records) == len(offsets), "a bad message went to the DLQ twice, or not at all"
    assert got == {offset: reason for offset, (_, reason) in offsets.items()}
    return {offsets[o][0]: got[o] for o in sorted(got)}


def test_malformed_frames_go_to_the_dlq_with_reason_and_offset_and_the_stream_goes_on(
    kafka_settings: KafkaSettings, reliability_app: str, figures: Record
) -> None:
    config = topics(kafka_settings, partitions=1)
    good, offsets = _send_interleaved(kafka_settings, config.frames_topic, MALFORMED)
    totals = run_classifier(kafka_settings, config, reliability_app)
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, len(good)))
    counts = tally(good, labels)
    reasons = _check_dlq(kafka_settings, config.frames_topic, config.dlq_topic, offsets)
    figures(**counts, bad_messages=len(offsets), dlq_records=totals["dlq"], reasons=reasons)
    assert counts["losses"] == 0 and counts["duplicates"] == 0 and counts["unexpected"] == 0
    assert totals["dlq"] == len(MALFORMED)
    # The stream went on: the good frame after each bad one has its label, in order.
    assert [lab.frame_index for lab in labels] == list(range(len(MALFORMED) + 1))


def test_bombs_and_oversized_frames_are_refused_before_decoding_with_bounded_memory(
    kafka_settings: KafkaSettings, reliability_app: str, replicas: Replicas, figures: Record
) -> None:
    # A topic that takes 12 MiB messages, above the replicas' 8 MiB frame limit.
    config = topics(
        kafka_settings, partitions=1, topic_config={"max.message.bytes": str(12 * 2**20)}
    )
    hostile: dict[str, tuple[dict[str, Any], str]] = {
        # 16000 x 16000 zeros: 256 MB inflated from ~250 kB (too many pixels for a replica).
        "PNG decompression bomb": (_bare(png_bomb(16000), b"image/png"), "too_many_pixels"),
        # A header that claims 60000 x 60000 (3.6 GB) over a few kB of data.
        "PNG claiming 3.6 gigapixels": (
            _bare(png_bomb(60000, rows=10), b"image/png"),
            "too_many_pixels",
        ),
        "Arrow frame claiming 50000 x 50000": (
            {"value": _raw_frame(50000, 50000, b"\x00" * 784), "headers": ARROW},
            "too_many_pixels",
        ),
        # Decoded in the classifier itself: 96 MiB from a few kB, refused from its metadata
        # (over max_message_decoded_bytes, 64 MiB) before anything is inflated.
        "ZSTD Arrow bomb (96 MiB)": (
            {"value": arrow_bomb(96 * 2**20), "headers": ARROW},
            "too_large",
        ),
        # Over the classifier's max_frame_bytes (8 MiB): refused before any Serve call.
        "9 MiB JPEG (over the frame limit)": (
            _bare(b"\xff\xd8" + os.urandom(9 * 2**20), b"image/jpeg"),
            "too_large",
        ),
    }
    (pid,) = replicas.pids(reliability_app)
    before_mb = peak_rss_mb(pid)
    good, offsets = _send_interleaved(kafka_settings, config.frames_topic, hostile)
    # Over the topic's own limit: the broker refuses the message, it never reaches anyone.
    p = producer(kafka_settings, max_request_size=32 * 2**20)
    with pytest.raises(MessageSizeTooLargeError):
        p.send(config.frames_topic, value=b"\x00" * (13 * 2**20), headers=ARROW).get(timeout=60)
    p.close()
    totals = run_classifier(kafka_settings, config, reliability_app)
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, len(good)))
    counts = tally(good, labels)
    reasons = _check_dlq(kafka_settings, config.frames_topic, config.dlq_topic, offsets)
    assert replicas.pids(reliability_app) == [pid], "the replica died"
    growth_mb = peak_rss_mb(pid) - before_mb
    figures(
        **counts,
        bad_messages=len(offsets) + 1,
        dlq_records=totals["dlq"],
        refused_by_broker=1,
        reasons=reasons,
        replica_peak_rss_growth_mb=round(growth_mb, 1),
    )
    assert counts["losses"] == 0 and counts["duplicates"] == 0 and counts["unexpected"] == 0
    # Decoding the first bomb alone would add 256 MB, the second 3.6 GB; the 9 MiB frame
    # itself passes through the replica as bytes (a few copies at most).
    assert growth_mb < 128, growth_mb


def test_a_bad_frame_too_large_for_the_dlq_topic_goes_there_without_its_value(
    kafka_settings: KafkaSettings, reliability_app: str, figures: Record
) -> None:
    """A frames topic that takes larger messages than its DLQ topic: the bad frame's DLQ
    record would be refused, and with it every commit behind it (the classifier would re-read
    it forever). Its value is left out instead, the headers still point at it."""
    from streams.classifier import dlq_value_limit

    config = topics(
        kafka_settings, partitions=1, topic_config={"max.message.bytes": str(4 * 2**20)}
    )
    dlq_limit = 2**20  # the DLQ topic takes 1 MiB
    set_max_message_bytes(kafka_settings, config.dlq_topic, dlq_limit)
    config = config.model_copy(update={"dlq_max_value_bytes": dlq_value_limit(dlq_limit)})
    small = os.urandom(1000)
    bad = {
        # 2 MiB: under the replicas' 8 MiB frame limit, so it is decoded (and fails) there.
        "2 MiB of random bytes as JPEG": (
            _bare(b"\xff\xd8" + os.urandom(2 * 2**20), b"image/jpeg"),
            "undecodable",
        ),
        "1000 random bytes as JPEG": (_bare(small, b"image/jpeg", 1), "undecodable"),
    }
    good, offsets = _send_interleaved(kafka_settings, config.frames_topic, bad)
    totals = run_classifier(kafka_settings, config, reliability_app)
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, len(good)))
    counts = tally(good, labels)
    reasons = _check_dlq(kafka_settings, config.frames_topic, config.dlq_topic, offsets)
    records = {
        int(dict(r.headers)["source.offset"]): r
        for r in read_topic(kafka_settings, config.dlq_topic, len(offsets))
    }
    big, little = sorted(offsets)
    assert records[big].value == b""
    assert dict(records[big].headers)["error.value_omitted"] == str(2 * 2**20 + 2).encode()
    assert records[little].value == small  # a value that fits is copied, as always
    assert "error.value_omitted" not in dict(records[little].headers)
    figures(
        **counts,
        bad_messages=len(offsets),
        dlq_records=totals["dlq"],
        reasons=reasons,
        dlq_value_omitted=1,
    )
    assert counts["losses"] == 0 and counts["duplicates"] == 0 and counts["unexpected"] == 0
    assert totals["dlq"] == 2
