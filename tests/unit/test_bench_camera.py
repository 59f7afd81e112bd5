"""The camera-resolution benchmarks' own arithmetic and options (issue 16 item 8), without a
stack: model names with an alpha, the options at 224, the measured peak and the efficiencies
against it, the frame-size option and the pipeline report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster.bench.camera import camera_clip, parse_frame_size, parse_frame_sizes
from cluster.bench.model import ModelBenchOptions, add_efficiency, camera_options, check_models
from cluster.bench.peak import measure_peak
from cluster.bench.pipeline import decode_share
from cluster.bench.report import pipeline_camera_markdown, write_pipeline_camera_outputs
from jobs.machine import describe


def test_model_names_take_an_alpha_only_for_mobilenet_and_only_untrained() -> None:
    assert check_models(["mobilenet_v2:1.0", "baseline_cnn"], random_weights=True) == []
    problems = check_models(["mobilenet_v2:1.0", "resnet", "baseline_cnn:2", "mobilenet_v2:x"],
                            random_weights=False)
    assert len(problems) == 4
    assert "--random-weights" in problems[0] and "resnet" in problems[1]
    assert "only mobilenet_v2" in problems[2] and "not a number" in problems[3]


def test_camera_options_default_to_224_with_fewer_samples_and_batches() -> None:
    options = camera_options(ModelBenchOptions(models=["baseline_cnn"]), None, True)
    assert (options.input_size, options.random_weights) == (224, True)
    assert options.batches == (1, 8, 32) and options.latency_samples == 50


def test_the_measured_peak_puts_efficiencies_against_a_real_rate() -> None:
    peak = measure_peak(iterations=200_000)
    if "error" in peak:  # no compiler or no AVX-512 VNNI here: said, not crashed
        pytest.skip(peak["error"])
    assert peak["int8_gmacs_1core"] > peak["fp32_gmacs_1core"] > 0 and peak["clock_ghz"] > 0
    row: dict[str, Any] = {"export": "litert-int8", "latency_ms_p50": 2.0, "throughput_ips": 1000.0,
           "throughput_threads": 2, "throughput_by_batch": {"1": 500.0, "8": 1000.0}}
    add_efficiency(row, 300_000_000, describe(), peak)
    # 300 M MACs x 500 images/s = 150 GMAC/s, against 1 core's int8 peak
    assert row["efficiency_latency_measured_pct"] == pytest.approx(
        100 * 150 / peak["int8_gmacs_1core"])
    assert row["efficiency_by_batch_measured_pct"]["8"] == pytest.approx(
        100 * 300 / (2 * peak["int8_gmacs_1core"]))


def test_frame_sizes_are_parsed_or_refused_naming_the_option() -> None:
    assert parse_frame_size("640x480") == (640, 480)
    assert parse_frame_size("1280X720") == (1280, 720)
    assert parse_frame_sizes("640x480, 1280x720") == [(640, 480), (1280, 720)]
    with pytest.raises(ValueError, match="--frame-size"):
        parse_frame_sizes(",")
    for bad in ("640", "0x480", "axb", "9000x10"):
        with pytest.raises(ValueError, match="--frame-size"):
            parse_frame_size(bad)


def test_a_clip_is_rgb_jpegs_of_the_size_asked() -> None:
    from io import BytesIO

    from PIL import Image

    clip, made_by = camera_clip(96, 64, frames=3)
    assert len(clip) == 3 and made_by
    image = Image.open(BytesIO(clip[0][0]))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 64))


def test_the_pipeline_report_gives_each_size_its_latency_rate_and_decode_share(
    tmp_path: Path,
) -> None:
    assert decode_share(1.0, 3.0) == 0.25 and decode_share(None, 3.0) is None
    offered = {"producer": {"cpu_seconds": 1.5}}
    flat = {"producer": {"cpu_seconds": 2.5}}
    results = {
        "machine": describe(), "artifact": "models/x", "cameras": 8, "fps_per_camera": 15.0,
        "model_ms_per_frame": {"batch": 16, "p50_ms": 0.6, "input_hwc": [224, 224, 3],
                               "runtime": "litert", "precision": "int8"},
        "sizes": [{"frame_size": "640x480", "jpeg_bytes_mean": 51000, "clip": "camera_jpeg",
                   "offered_p50_ms": 12.0, "offered_p99_ms": 40.0, "flat_out_fps": 420.0,
                   "decode_p50_ms": 1.2, "flat_out_decode_p50_ms": 1.3, "decode_share": 0.667,
                   "offered": offered, "flat_out": flat}],
    }
    text = pipeline_camera_markdown(results, "framecast bench pipeline --frame-size 640x480")
    assert "| 640x480 | 51000 | 12.0 | 40.0 | 420.0 | 1.2 / 1.3 | 67% | 1.5 / 2.5 |" in text
    paths = write_pipeline_camera_outputs(tmp_path, results, "framecast bench pipeline")
    assert [p.name for p in paths] == ["bench-pipeline.json", "bench-pipeline.md",
                                       "bench-pipeline.png"]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_bench_decode_reports_batch_preprocessing_before_and_after(tmp_path: Path) -> None:
    from cluster.bench.decode import bench_decode, write_outputs

    result = bench_decode(samples=3, sizes=((64, 48),), log=lambda _line: None)
    (row,) = result["batch"]
    assert row["frame"] == "64x48" and row["converter"] == "xor"
    assert set(row["cpu_p50_ms_per_frame"]) == {"decode", "float_path", "direct"}
    write_outputs(tmp_path, result, "framecast bench decode")
    assert "| 64x48 | 16 |" in (tmp_path / "bench-decode.md").read_text()
