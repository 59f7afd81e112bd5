"""The paper table: reductions and speed-ups computed against the baseline row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.exceptions import OptionError
from jobs.report import (
    PAPER_CLAIMS,
    paper_table,
    plot_accuracy_latency,
    report_spec,
    shipped_notes,
    table_markdown,
)


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


def test_scenes_report_at_224_shortens_and_says_so() -> None:
    spec = report_spec("scenes", quick=False, input_size=224)
    assert [p.model for p in spec.plans] == ["baseline_cnn", "mobilenet_v2", "camera_cnn"]
    baseline = spec.plans[0]
    assert baseline.train_size is not None and baseline.train_size < 224
    assert any("latency measured at 224x224" in line for line in spec.shortened)
    quick = report_spec("scenes", quick=True)
    assert quick.input_size == 32 and quick.plans[0].train_size == 16
    with pytest.raises(OptionError, match="--dataset"):
        report_spec("synthetic")
    with pytest.raises(OptionError, match="multiple of 32"):
        report_spec("scenes", input_size=100)


def test_scenes_table_uses_the_latency_at_the_report_size_and_sits_beside_fashion_mnist() -> None:
    spec = report_spec("scenes", quick=False, input_size=224)
    baseline = _row("baseline_cnn", 0.5, 4.0, 2_000_000)
    baseline["train_size"] = 64
    baseline["latency_at_size"] = {"latency_ms_p50": 200.0, "latency_ms_p99": 250.0,
                                   "peak_rss_mb": 900.0, "input_size": 224}
    rows = [baseline, _row("mobilenet_v2", 0.6, 20.0, 9_000_000),
            _row("camera_cnn", 0.7, 2.0, 200_000)]
    table = paper_table(rows)
    assert table[0]["ms_per_image_p50"] == 200.0  # measured at 224, not at 64
    assert table[0]["ms_per_image_at_train_size"] == 4.0
    assert table[2]["speedup_vs_baseline"] == pytest.approx(100.0)
    assert table[2]["paper"] == PAPER_CLAIMS["optimized_cnn"]
    text = table_markdown(table, quick=False, spec=spec)
    assert "Camera scenes at 224x224 RGB" in text
    assert "Beside the Fashion-MNIST table" in text
    assert "| camera_cnn / optimized_cnn (int8) | 70.00, 2.000" in text
    assert "trained at its training size 64x64" not in text
    assert "4.000 ms/image at its training size 64x64; 200.000 at 224x224" in text


def test_the_fashion_mnist_table_names_the_shipped_models_recipes(tmp_path: Path) -> None:
    optimized = tmp_path / "fashion_mnist_optimized"
    optimized.mkdir()
    (optimized / "manifest.json").write_text(json.dumps({
        "model": "optimized_fc", "metrics": {"accuracy": 0.9461, "runtime": "tflite"},
        "training": {"epochs": 24, "recipe": {
            "augment": True, "augment_policy": "light", "label_smoothing": 0.0,
            "random_erasing": 0.5, "warmup_epochs": 1, "teacher": None}}}))
    stream = tmp_path / "fashion_mnist_stream"
    stream.mkdir()
    (stream / "manifest.json").write_text(json.dumps({
        "model": "stream_fc", "metrics": {"accuracy": 0.9235, "runtime": "tflite"},
        "training": {"epochs": 15, "recipe": {"augment": False,
                                              "teacher": {"name": "fashion-mnist-optimized"}}}}))
    assert shipped_notes(tmp_path)[-2:] == [
        "- `models/fashion_mnist_optimized`: optimized_fc, 24 epochs, augment_policy light, "
        "random_erasing 0.5, warmup_epochs 1: 94.61 % (tflite)",
        "- `models/fashion_mnist_stream`: stream_fc, 15 epochs, no augmentation, teacher "
        "fashion-mnist-optimized: 92.35 % (tflite)"]
    assert shipped_notes(tmp_path / "elsewhere") == []
    # The report's own table says so, from the repository's models/.
    text = table_markdown(paper_table([_row("optimized_cnn", 0.93, 0.5, 200_000)]), quick=False)
    assert "shipped models were trained with other recipes than this run's" in text
    assert "- `models/fashion_mnist_stream`: stream_fc, 15 epochs" in text
