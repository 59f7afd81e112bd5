"""The paper table: reductions and speed-ups computed against the baseline row."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.report import PAPER_CLAIMS, paper_table, plot_accuracy_latency, table_markdown


def _row(model: str, accuracy: float, latency: float, size: int) -> dict:
    metrics = {
        "accuracy": accuracy,
        "precision_macro": 0.5,
        "recall_macro": 0.5,
        "f1_macro": 0.5,
        "latency_ms_p50": latency,
        "latency_ms_p99": latency * 2,
        "throughput_ips": 1000.0 / latency,
        "size_bytes": size,
        "gzip_bytes": size // 2,
        "peak_rss_mb": 100.0,
        "param_count": 10,
        "sparsity": 0.0,
        "samples": 10,
        "runtime": "tflite",
    }
    return {"model": model, "epochs": 1, "prune": "none", "quantize": "none", "metrics": metrics}


def test_table_compares_against_the_baseline(tmp_path: Path) -> None:
    rows = [
        _row("baseline_cnn", 0.9, 2.0, 2_000_000),
        _row("mobilenet_v2", 0.8, 1.0, 1_000_000),
        _row("optimized_cnn", 0.95, 0.25, 100_000),
    ]
    table = paper_table(rows)
    assert table[0]["memory_reduction_pct"] == pytest.approx(0.0)
    assert table[2]["memory_reduction_pct"] == pytest.approx(95.0)
    assert table[2]["speedup_vs_baseline"] == pytest.approx(8.0)
    assert table[2]["paper"] == PAPER_CLAIMS["optimized_cnn"]
    text = table_markdown(table, quick=True)
    assert "| optimized_cnn |" in text and "95.00 (92.0)" in text
    plot_accuracy_latency(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
