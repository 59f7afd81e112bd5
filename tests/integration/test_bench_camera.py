"""`bench pipeline --frame-size` and `bench model --random-weights --input-size`, on tiny
inputs (issue 16 item 8). Figures are not checked (the machine is shared); that every frame
is labelled with its decode time, and that the reports carry their fields, is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench.pipeline import _pipeline_run
from streams.config import KafkaSettings
from tests.conftest import run_cli
from tests.integration.test_bench_pipeline import session_app_settings

pytestmark = pytest.mark.slow


def test_pre_encoded_rgb_camera_frames_run_through_the_pipeline_with_decode_times(
    kafka_settings: KafkaSettings, stream_app: str, tmp_path: Path
) -> None:
    # The session's Serve app (the shipped gray model): RGB JPEGs are converted on decode.
    settings = session_app_settings(kafka_settings, stream_app, tmp_path)
    run = _pipeline_run(
        settings, str(kafka_settings.bootstrap_servers), cameras=2, fps=0.0, per_camera=24,
        batch=8, classifier="framecast", frame_size=(160, 120),
    )
    assert run["frames"] == run["labels"] == 48
    producer = run["producer"]
    assert producer["frame_size"] == "160x120" and producer["cpu_seconds"] > 0
    assert producer["jpeg_bytes_mean"] > 0
    assert run["p50_parts_ms"]["decode"] > 0 and run["p50_parts_ms"]["inference"] > 0


def test_bench_model_random_weights_at_an_input_size_measures_latency_only(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    result = run_cli(
        "bench", "model", "--random-weights", "--input-size", "32", "--models",
        "optimized_cnn", "--out", str(out), home=tmp_path / "home", timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "bench-model.json").read_text())
    assert data["options"]["input_size"] == 32 and data["options"]["random_weights"]
    (model,) = data["models"]
    assert model["input_shape"] == [32, 32, 3] and model["source"].startswith("random")
    int8 = next(r for r in data["rows"] if r["export"] == "litert-int8")
    assert not int8.get("error") and "accuracy" not in int8
    assert int8["latency_ms_p50"] > 0 and set(int8["throughput_by_batch"]) == {"1", "8", "32"}
    if "error" not in data["peak_measured"]:
        assert int8["efficiency_latency_measured_pct"] > 0
        assert set(int8["efficiency_by_batch_measured_pct"]) == {"1", "8", "32"}
    assert "random weights" in (out / "bench-model.md").read_text()
    bad = run_cli("bench", "model", "--models", "mobilenet_v2:1.0", home=tmp_path / "home")
    assert bad.returncode == 2 and "--random-weights" in bad.stderr
