"""Label and latency records, and the Parquet sink, without a broker."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from serving.results import ClassifyResult
from streams.labels import LabelRecord, encode_label, label_record
from streams.latency import LatencyRecord, LatencyWindow, encode_latency
from streams.sinks import ParquetSink

RESULT = ClassifyResult(
    3, "Dress", 0.9, {"name": "m", "version": "1", "sha256": "ab" * 32, "runtime": "litert"}, 0.2
)


def _label(result: ClassifyResult | None, offset: int = 7) -> dict:
    return label_record(
        stream_id="cam-1",
        frame_index=offset,
        topic="frames",
        partition=2,
        offset=offset,
        row=0,
        result=result,
        captured_at_ns=1_000,
        labeled_at_ns=5_000_000,
        timings_ms={"broker": 1.0, "queue": 0.5, "inference": 0.2, "end_to_end": 4.999},
        ground_truth=3,
    )


def test_label_record_round_trips_through_the_reader_model() -> None:
    record = LabelRecord.model_validate_json(encode_label(_label(RESULT)))
    assert record.class_id == 3
    assert record.status == "ok"
    assert record.source.partition == 2
    assert record.model == {"name": "m", "version": "1", "sha256": "ab" * 32}


def test_dropped_frame_is_labelled_dropped_with_null_class() -> None:
    record = LabelRecord.model_validate_json(encode_label(_label(None)))
    assert record.status == "dropped_deadline"
    assert record.class_id is None and record.model is None


def test_latency_window_percentiles_and_counts() -> None:
    window = LatencyWindow("c-1")
    window.latencies_ms.extend(float(v) for v in range(1, 101))
    window.dropped, window.dlq = 2, 1
    record = LatencyRecord.model_validate_json(encode_latency(window.snapshot(lag=5)))
    assert record.frames == 100
    assert record.p50_ms == 50.5
    assert record.max_ms == 100.0
    assert (record.dropped_deadline, record.dlq, record.lag) == (2, 1, 5)
    empty = json.loads(encode_latency(LatencyWindow("c-2").snapshot(lag=None)))
    assert empty["frames"] == 0 and empty["p99_ms"] is None


def test_parquet_sink_writes_flat_label_and_latency_rows(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, "c-1", rows_per_file=2)
    for offset in range(3):
        sink.add_label(_label(RESULT, offset))
    sink.add_latency(LatencyWindow("c-1").snapshot(lag=0))
    sink.close()
    labels = [pq.read_table(p) for p in sorted(tmp_path.glob("labels-*.parquet"))]
    assert sum(t.num_rows for t in labels) == 3
    row = labels[0].to_pylist()[0]
    assert row["source_offset"] == 0 and row["end_to_end_ms"] == 4.999
    assert row["model_version"] == "1"
    assert pq.read_table(next(tmp_path.glob("latency-*.parquet"))).num_rows == 1
