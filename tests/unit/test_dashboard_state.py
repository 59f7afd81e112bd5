"""The aggregation behind the dashboard page (cluster/dashboard/state.py): no broker, no browser."""

from __future__ import annotations

import io

import numpy as np
import orjson
import pytest
from PIL import Image

from cluster.dashboard.app import render_picture
from cluster.dashboard.state import (
    RELATIVE_ERROR,
    DashboardState,
    DeadLetter,
    PartitionLag,
    latency_bin,
    natural_key,
    percentile,
)
from serving.frames import FrameRecord

S = 1_000_000_000
T0 = 1_700_000_000 * S  # a whole second


def label(
    stream: str,
    index: int,
    at_ns: int,
    ms: float = 10.0,
    *,
    status: str = "ok",
    name: str = "Coat",
    class_id: int = 4,
    truth: int | None = None,
    version: str = "v1",
) -> dict[str, object]:
    ok = status == "ok"
    return {
        "stream_id": stream,
        "frame_index": index,
        "source": {"topic": "frames", "partition": 0, "offset": index, "row": 0},
        "status": status,
        "class_id": class_id if ok else None,
        "label": name if ok else None,
        "score": 0.75 if ok else None,
        "model": {"name": "fmnist", "version": version, "sha256": "ab" * 32} if ok else None,
        "captured_at_ns": at_ns - int(ms * 1e6),
        "labeled_at_ns": at_ns,
        "timings_ms": {"end_to_end": ms},
        "ground_truth": truth,
    }


def raw_frame(stream: str, index: int, h: int = 28, w: int = 28, c: int = 1) -> FrameRecord:
    pixels = (np.arange(h * w * c) % 251).astype(np.uint8).tobytes()
    return FrameRecord(stream, index, T0, "raw", h, w, c, pixels, None)


def test_histogram_percentiles_are_within_the_bin_error_of_exact_ones() -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=2.5, sigma=0.8, size=20_000)
    histogram = np.zeros(800, dtype=np.int64)
    for v in values:
        histogram[latency_bin(float(v))] += 1
    for q in (1, 50, 90, 99, 99.9):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        assert percentile(histogram, q) == pytest.approx(exact, rel=2 * RELATIVE_ERROR)
    assert RELATIVE_ERROR < 0.012
    assert percentile(np.zeros(800, dtype=np.int64), 50) is None


def test_out_of_range_latencies_land_in_the_end_bins() -> None:
    assert latency_bin(0.0) == 0
    assert latency_bin(-5.0) == 0
    assert latency_bin(1e12) == 799


def test_each_camera_keeps_its_last_label_and_its_counts() -> None:
    state = DashboardState()
    state.add_label(label("cam-1", 0, T0, name="Coat", class_id=4, truth=4))
    state.add_label(label("cam-1", 1, T0 + 1000, name="Bag", class_id=8, truth=0))
    state.add_label(label("cam-2", 0, T0 + 2000, status="dropped_deadline"))
    cam1, cam2 = state.cameras["cam-1"], state.cameras["cam-2"]
    assert (cam1.label, cam1.class_id, cam1.frame_index, cam1.labelled) == ("Bag", 8, 1, 2)
    assert (cam1.correct, cam1.with_truth) == (1, 2)
    assert (cam2.labelled, cam2.dropped, cam2.label) == (0, 1, None)
    assert cam2.status == "dropped_deadline"
    assert (state.labelled, state.dropped) == (2, 1)
    snapshot = state.snapshot(T0 + 2 * S)
    assert snapshot["totals"]["accuracy"] == 0.5
    assert snapshot["model"] == {"name": "fmnist", "version": "v1", "sha256": "ab" * 32}


def test_the_window_counts_whole_seconds_before_now_only() -> None:
    state = DashboardState(window_s=10)
    latencies = []
    for second in range(20):
        for k in range(5):
            ms = 5.0 + second + k
            state.add_label(label(f"cam-{k}", second, T0 + second * S + k, ms))
            if 10 <= second < 20:
                latencies.append(ms)
    # the second now_ns is in (20) has one label: it is not complete, so it is left out
    state.add_label(label("cam-0", 99, T0 + 20 * S + 1, 1000.0))
    window = state.window(T0 + 20 * S + S // 2, 10)
    assert window["frames"] == 50
    assert window["fps"] == 5.0
    assert window["p50_ms"] == pytest.approx(
        np.percentile(latencies, 50, method="inverted_cdf"), rel=2 * RELATIVE_ERROR
    )
    assert window["p99_ms"] == pytest.approx(max(latencies), rel=2 * RELATIVE_ERROR)


def test_charts_cover_the_history_and_old_seconds_are_forgotten() -> None:
    state = DashboardState(history_s=30)
    for second in range(100):
        state.add_label(label("cam-0", second, T0 + second * S, 10.0))
    assert len(state.seconds) <= 31
    series = state.series(T0 + 100 * S)
    assert len(series["t"]) == len(series["fps"]) == len(series["p99"]) == 30
    assert series["t"][-1] == T0 // S + 99
    assert series["fps"] == [1] * 30
    assert state.labelled == 100  # the totals keep everything
    state.add_label(label("cam-0", 0, T0, 10.0))  # a late label older than the charts
    assert state.labelled == 101
    assert T0 // S not in state.seconds


def test_consumer_aggregates_are_placed_at_their_seconds() -> None:
    state = DashboardState(history_s=60)
    for k in range(3):
        state.add_latency({
            "consumer": "c1", "window_s": 5.0, "frames": 100, "fps": 20.0 + k, "p50_ms": 5.0,
            "p95_ms": 8.0, "p99_ms": 9.0 + k, "max_ms": 12.0, "dropped_deadline": 1, "dlq": 2,
            "lag": 7 - k, "at_ns": T0 + (10 + 5 * k) * S,
        })
    series = state.series(T0 + 60 * S)
    fps = series["consumers"]["c1"]["fps"]
    t = series["t"]
    assert fps[t.index(T0 // S + 10)] == 20.0
    assert fps[t.index(T0 // S + 20)] == 22.0
    assert sum(v is not None for v in fps) == 3
    row = state.snapshot(T0 + 60 * S)["consumers"][0]
    assert (row["consumer"], row["fps"], row["lag"], row["dropped_total"], row["dlq_total"]) == (
        "c1", 22.0, 5, 3, 6
    )


def test_bad_records_are_counted_not_raised() -> None:
    state = DashboardState()
    state.add_label({"stream_id": "cam-0"})
    state.add_label({"stream_id": "cam-0", "frame_index": "x", "labeled_at_ns": T0})
    state.add_latency({"consumer": "c1"})
    state.add_label(label("cam-0", 0, T0) | {"timings_ms": None})
    assert state.bad_records == 3
    assert state.labelled == 1


def test_frames_are_sampled_per_camera_and_find_their_label() -> None:
    state = DashboardState(frame_interval_s=0.5)
    state.add_label(label("cam-1", 7, T0, name="Bag"))
    assert state.wants_frame("cam-1", T0)
    state.add_frame(raw_frame("cam-1", 7), T0)
    picture = state.picture("cam-1")
    assert picture is not None and (picture.label, picture.frame.frame_index) == ("Bag", 7)
    assert not state.wants_frame("cam-1", T0 + S // 4)
    assert state.wants_frame("cam-1", T0 + S // 2)
    # a frame pictured before its label: the label finds it when it arrives
    state.add_frame(raw_frame("cam-1", 8), T0 + S)
    assert state.picture("cam-1").label is None  # type: ignore[union-attr]
    state.add_label(label("cam-1", 8, T0 + S, name="Coat"))
    assert state.picture("cam-1").label == "Coat"  # type: ignore[union-attr]
    first = state.snapshot(T0 + 2 * S)["cameras"][0]["picture"]
    state.add_frame(raw_frame("cam-1", 9), T0 + 2 * S)
    assert state.snapshot(T0 + 2 * S)["cameras"][0]["picture"]["seq"] != first["seq"]


def test_cameras_past_the_limit_are_counted_not_kept() -> None:
    state = DashboardState(max_cameras=3)
    for k in range(5):
        state.add_label(label(f"cam-{k}", 0, T0))
    assert len(state.cameras) == 3
    assert state.cameras_refused == 2
    assert state.labelled == 5
    assert not state.wants_frame("cam-4", T0)


def test_cameras_are_listed_in_natural_order() -> None:
    state = DashboardState()
    for name in ("cam-10", "cam-2", "cam-1", "alpha"):
        state.add_label(label(name, 0, T0))
    assert [c["id"] for c in state.snapshot(T0)["cameras"]] == [
        "alpha", "cam-1", "cam-2", "cam-10"
    ]
    assert natural_key("cam-2") < natural_key("cam-10")


def test_dead_letters_keep_the_latest_with_their_source() -> None:
    state = DashboardState(dead_letters_kept=3)
    for offset in range(5):
        state.add_dead_letter(DeadLetter.from_headers(
            0, offset, 1_700_000_000_000, b"cam-3",
            [("error.reason", b"bad_arrow" if offset % 2 else b"empty_value"),
             ("error.class", b"FrameSchemaError"), ("source.topic", b"frames"),
             ("source.partition", b"2"), ("source.offset", str(100 + offset).encode()),
             ("source.row", b"0"), ("content-type", None)],
        ))
    dlq = state.snapshot(T0)["dlq"]
    assert dlq["total"] == 5
    assert dlq["reasons"] == {"empty_value": 3, "bad_arrow": 2}
    assert [d["offset"] for d in dlq["latest"]] == [4, 3, 2]
    assert dlq["latest"][0]["source"] == {"topic": "frames", "partition": 2, "offset": 104,
                                          "row": 0}
    assert dlq["latest"][0]["key"] == "cam-3"


def test_a_dead_letter_without_its_headers_is_still_listed() -> None:
    letter = DeadLetter.from_headers(1, 9, None, None, [("source.offset", b"not a number")])
    assert (letter.reason, letter.source_topic, letter.source_offset) == ("(none)", None, None)


def test_lag_per_partition_and_in_total() -> None:
    state = DashboardState()
    state.set_partitions("framecast", [
        PartitionLag("frames", 0, 90, 100), PartitionLag("frames", 1, None, 50),
        PartitionLag("frames", 2, 60, 50),  # a commit past the end we read: no negative lag
    ])
    lag = state.snapshot(T0)["lag"]
    assert [p["lag"] for p in lag["partitions"]] == [10, None, 0]
    assert (lag["total"], lag["group"]) == (10, "framecast")


def test_a_snapshot_is_json() -> None:
    state = DashboardState(history_s=20)
    state.add_label(label("cam-1", 0, T0))
    state.add_frame(raw_frame("cam-1", 0), T0)
    state.waiting_for.add("frames.dlq")
    snapshot = orjson.loads(orjson.dumps(state.snapshot(T0 + S)))
    assert snapshot["cameras"][0]["picture"]["label"] == "Coat"
    assert snapshot["waiting_for"] == ["frames.dlq"]


def test_raw_frames_are_rendered_as_images_and_images_pass_through() -> None:
    png, mime = render_picture(raw_frame("cam-1", 0)) or (b"", "")
    assert mime == "image/png"
    assert Image.open(io.BytesIO(png)).size == (28, 28)
    big, mime = render_picture(raw_frame("cam-1", 0, 720, 1280, 3)) or (b"", "")
    assert mime == "image/jpeg"
    assert max(Image.open(io.BytesIO(big)).size) == 480
    jpeg = FrameRecord("cam-1", 0, T0, "jpeg", 0, 0, 0, b"\xff\xd8\xff\xe0rest", None)
    assert render_picture(jpeg) == (jpeg.data, "image/jpeg")
    assert render_picture(FrameRecord("cam-1", 0, T0, "raw", 28, 28, 1, b"short", None)) is None
    assert render_picture(FrameRecord("cam-1", 0, T0, "png", 0, 0, 0, b"<svg>", None)) is None


def test_a_stream_that_just_started_fills_the_charts_and_its_rate_is_not_diluted() -> None:
    state = DashboardState(history_s=300, window_s=60)
    for second in range(10):
        for k in range(8):
            state.add_label(label(f"cam-{k}", second, T0 + second * S + k))
    now = T0 + 10 * S
    series = state.series(now)
    assert len(series["t"]) == 60  # not 300 seconds, 290 of them empty
    assert series["t"][0] <= T0 // S - 10
    assert state.window(now, 60)["fps"] == 8.0  # 80 labels over the 10 s there were
