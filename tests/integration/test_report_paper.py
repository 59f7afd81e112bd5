"""`report paper --quick --dataset scenes`: the three paper models on tiny RGB camera scenes,
trained on the session's Ray cluster, in one table beside the paper's claims and the
Fashion-MNIST table (every path of the 224 run, at 32 px, one epoch each)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from jobs.report import write_paper_report


def test_quick_scenes_report_trains_the_three_models_and_writes_the_table(
        serve_port: int, tmp_path: Path) -> None:
    # serve_port: this process's driver connection to the session Ray cluster (as
    # test_train_ray), so Ray Train runs there beside the other modules' Serve apps.
    log = io.StringIO()
    # One CPU a worker: the cluster's nodes have 2 each, the default (all free CPUs) fits none.
    paths = write_paper_report(tmp_path, quick=True, console=Console(file=log),
                               dataset="scenes", cpus_per_worker=1)
    assert [p.name for p in paths] == ["table.md", "table.json", "accuracy_latency.png"]
    table = json.loads((tmp_path / "table.json").read_text())
    assert (table["dataset"], table["input_size"], table["quick"]) == ("scenes", 32, True)
    rows = {row["model"]: row for row in table["rows"]}
    assert list(rows) == ["baseline_cnn", "mobilenet_v2", "camera_cnn"]
    # baseline_cnn trained at 16 px, its latency measured apart at the report's 32 px.
    assert (rows["baseline_cnn"]["train_size"], rows["baseline_cnn"]["latency_size"]) == (16, 32)
    assert rows["baseline_cnn"]["ms_per_image_at_train_size"] > 0
    assert rows["camera_cnn"]["runtime"] == "tflite"  # pruned + int8
    assert rows["camera_cnn"]["sparsity"] > 0.3
    for row in rows.values():
        assert row["samples"] == 64
        assert 0 <= row["accuracy_pct"] <= 100
        assert row["ms_per_image_p50"] > 0 and row["size_bytes"] > 0
    text = (tmp_path / "table.md").read_text()
    assert "Camera scenes at 32x32 RGB" in text and "Beside the Fashion-MNIST table" in text
    assert "| camera_cnn | prune polynomial, quantize int8 |" in text
    assert "baseline_cnn trained at 16x16" in text
