"""The demo report's latency-over-time windows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cluster.demo import PRESETS, decode_summary, latency_by_window


def test_windows_split_labels_by_label_time_and_give_each_its_percentiles() -> None:
    start = 1_700_000_000_000_000_000
    # 0-10 s: 100 slow labels (a just-started stack); 10-20 s: none; 20-30 s: 100 fast ones.
    slow = [(start + i * 50_000_000, 100.0 + i) for i in range(100)]  # 0 .. 4.95 s
    fast = [(start + 20_000_000_000 + i * 10_000_000, 10.0) for i in range(100)]
    times, latencies = zip(*(fast + slow), strict=True)  # out of order on purpose
    windows = latency_by_window(list(latencies), list(times), window_s=10.0)
    assert [w["from_s"] for w in windows] == [0.0, 20.0]  # the empty window is left out
    assert [w["frames"] for w in windows] == [100, 100]
    assert windows[0]["p50"] == 149.5
    assert windows[0]["p99"] == 198.01
    assert windows[1]["p50"] == windows[1]["p99"] == 10.0


def test_no_labels_no_windows() -> None:
    assert latency_by_window([], []) == []


def test_decode_summary_gives_the_replicas_decode_time_and_its_share_of_end_to_end() -> None:
    decode = decode_summary([1.0, 2.0, 3.0, 2.0], [10.0, 10.0, 10.0, 10.0])
    assert decode == {"p50_ms": 2.0, "mean_ms": 2.0, "share_of_end_to_end_pct": 20.0}
    assert decode_summary([], []) is None


def test_a_preset_whose_model_is_missing_says_so(tmp_path: Path) -> None:
    missing = replace(PRESETS["fashion-mnist"], artifact=tmp_path / "nothing")
    assert "no manifest.json" in (missing.problem() or "")
    assert PRESETS["fashion-mnist"].problem() is None  # shipped
    assert set(PRESETS) == {"scenes", "scenes-heldout", "fashion-mnist"}
    assert PRESETS["scenes-heldout"].source == "scenes:heldout"
    assert (PRESETS["scenes"].cameras, PRESETS["scenes"].fps,
            PRESETS["scenes"].frame_size) == (8, 15.0, "640x480")
