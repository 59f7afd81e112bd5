"""Machine line, peak MAC arithmetic, efficiency, the Pareto front and the operating point."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.bench.model import add_efficiency, summarize, with_artifact_model
from jobs.machine import (
    CpuInfo,
    describe,
    efficiency_pct,
    machine_line,
    parse_cpuinfo,
    peak_mac_rate,
    peak_macs_per_cycle,
)
from jobs.sweep import choose_operating_point, dominates, pareto_front, sweep_markdown

ZEN3 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC
cpu MHz		: 2445.424
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD EPYC
cpu MHz		: 2445.424
flags		: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""

SAPPHIRE_RAPIDS = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz
flags		: fpu avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8
"""


def test_cpuinfo_parse_reads_model_cores_clock_and_flags() -> None:
    cpu = parse_cpuinfo(ZEN3)
    assert cpu.model == "AMD EPYC"
    assert cpu.logical_cpus == 2
    assert cpu.mhz == pytest.approx(2445.424)
    assert cpu.flags == ("sse4_2", "avx", "avx2", "fma", "f16c")
    assert not cpu.has("avx512f")


def test_cpuinfo_without_mhz_takes_the_clock_from_the_model_name() -> None:
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert cpu.mhz == pytest.approx(2000.0)
    assert {"avx512f", "avx512_vnni", "amx_int8"} <= set(cpu.flags)


def test_machine_line_names_the_isa_features_gpu_and_load() -> None:
    info = {
        "model": "AMD EPYC",
        "mhz": 2445.4,
        "cores": 2,
        "flags": ["avx2", "fma"],
        "gpus": [],
        "loadavg": [1.5, 2.0, 2.25],
        "date": "2026-11-24 10:00 UTC",
    }
    line = machine_line(info)
    assert line.startswith("AMD EPYC @ 2.45 GHz, 2 cores")
    assert "AVX-512 no, VNNI no, AMX no" in line
    assert "no GPU" in line and "1.50/2.00/2.25" in line
    amx = machine_line(
        {**info, "flags": ["avx512f", "avx512_vnni", "amx_int8"], "gpus": ["GPU 0: NVIDIA H100"]}
    )
    assert "AVX-512 yes, VNNI yes, AMX yes" in amx and "NVIDIA H100" in amx


def test_this_machine_is_described() -> None:
    info = describe()
    assert info["cores"] >= 1
    assert len(info["loadavg"]) == 3
    assert isinstance(info["flags"], list)
    assert machine_line(info)


def test_peak_macs_per_cycle_follows_the_vector_width_and_extensions() -> None:
    avx2 = parse_cpuinfo(ZEN3)
    assert peak_macs_per_cycle(avx2, "float32")[0] == 16  # 8 lanes x 2 FMA pipes
    assert peak_macs_per_cycle(avx2, "int8")[0] == 64  # 32 bytes x 2 pipes
    avx512 = CpuInfo("x", 1, 3000.0, ("avx2", "fma", "avx512f", "avx512_vnni"))
    assert peak_macs_per_cycle(avx512, "float32")[0] == 32
    assert peak_macs_per_cycle(avx512, "int8")[0] == 128
    assert "VNNI" in peak_macs_per_cycle(avx512, "int8")[1]
    assert peak_macs_per_cycle(parse_cpuinfo(SAPPHIRE_RAPIDS), "int8")[0] == 1024
    with pytest.raises(ValueError, match="dtype"):
        peak_macs_per_cycle(avx2, "bfloat16")


def test_peak_rate_and_efficiency_arithmetic() -> None:
    cpu = CpuInfo("x", 2, 2500.0, ("avx2", "fma"))
    rate, how = peak_mac_rate(cpu, "float32", cores=2)
    assert rate == pytest.approx(2 * 2.5e9 * 16)  # 80 GMAC/s
    assert "80.0 GMAC/s" in how and "2 core(s)" in how
    # 20 M MACs per image at 1,000 images/s = 20 GMAC/s = 25 % of 80 GMAC/s.
    assert efficiency_pct(20e6, 1000.0, rate) == pytest.approx(25.0)
    with pytest.raises(ValueError):
        efficiency_pct(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="clock"):
        peak_mac_rate(CpuInfo("x", 1, None, ("avx2",)), "float32")


def test_efficiency_of_a_row_uses_int8_peak_for_int8_exports() -> None:
    info = {"model": "x", "logical_cpus": 2, "mhz": 2500.0, "flags": ["avx2", "fma"]}
    float_row = {
        "model": "m",
        "export": "litert-float32",
        "latency_ms_p50": 1.0,
        "throughput_ips": 2000.0,
        "throughput_threads": 2,
    }
    int8_row = {**float_row, "export": "litert-int8"}
    add_efficiency(float_row, 20_000_000, info)
    add_efficiency(int8_row, 20_000_000, info)
    # 20 M MACs in 1 ms = 20 GMAC/s on one core of 40 GMAC/s (fp32) / 160 GMAC/s (int8).
    assert float_row["efficiency_latency_pct"] == pytest.approx(50.0)
    assert int8_row["efficiency_latency_pct"] == pytest.approx(12.5)
    # 2,000 images/s x 20 M = 40 GMAC/s on two cores (80 / 320 GMAC/s).
    assert float_row["efficiency_throughput_pct"] == pytest.approx(50.0)
    assert int8_row["efficiency_throughput_pct"] == pytest.approx(12.5)


def test_summary_picks_winners_and_ratios() -> None:
    rows = [
        {
            "model": "m",
            "export": "keras",
            "latency_ms_p50": 30.0,
            "throughput_ips": 100.0,
            "gzip_bytes": 500,
            "accuracy": 0.9,
        },
        {
            "model": "m",
            "export": "litert-float32",
            "latency_ms_p50": 0.5,
            "throughput_ips": 2000.0,
            "gzip_bytes": 450,
            "accuracy": 0.9,
        },
        {
            "model": "m",
            "export": "litert-int8",
            "latency_ms_p50": 0.3,
            "throughput_ips": 3000.0,
            "gzip_bytes": 120,
            "accuracy": 0.91,
        },
        {
            "model": "m",
            "export": "onnxruntime",
            "latency_ms_p50": 0.6,
            "throughput_ips": 1500.0,
            "gzip_bytes": 460,
            "accuracy": 0.9,
        },
        {"model": "m", "export": "saved_model", "error": "boom"},
    ]
    s = summarize(rows)["m"]
    assert s["fastest_batch1"] == "litert-int8"
    assert s["highest_throughput"] == "litert-int8"
    assert s["smallest"] == "litert-int8"
    assert s["keras_over_int8_latency"] == pytest.approx(100.0)
    assert s["onnxruntime_over_litert_float32_latency"] == pytest.approx(1.2)
    assert s["litert_int8_over_onnxruntime_throughput"] == pytest.approx(2.0)


def _p(acc: float, lat: float, size: int, **extra: object) -> dict:
    return {"accuracy": acc, "latency_ms_p50": lat, "gzip_bytes": size, **extra}


def test_dominance_needs_one_strictly_better_objective() -> None:
    assert dominates(_p(0.9, 1.0, 100), _p(0.9, 2.0, 100))
    assert not dominates(_p(0.9, 1.0, 100), _p(0.9, 1.0, 100))  # equal: neither
    assert not dominates(_p(0.8, 1.0, 100), _p(0.9, 2.0, 100))  # a trade-off


def test_pareto_front_keeps_trade_offs_and_drops_dominated_and_failed_points() -> None:
    points = [
        _p(0.92, 2.0, 500),  # most accurate
        _p(0.91, 1.0, 150),  # faster and smaller
        _p(0.90, 1.5, 600),  # dominated by 1
        _p(0.85, 0.8, 140),  # fastest and smallest
        _p(0.99, 0.1, 10, error="qat failed"),  # not measured
        _p(0.91, 1.0, 150),  # a tie with 1: neither dominates the other
    ]
    assert pareto_front(points) == [0, 1, 3, 5]
    assert pareto_front([]) == []


def test_operating_point_is_the_fastest_front_point_within_the_accuracy_budget() -> None:
    points = [_p(0.92, 2.0, 500), _p(0.915, 1.0, 150), _p(0.85, 0.5, 140), _p(0.915, 1.0, 120)]
    front = pareto_front(points)
    assert front == [0, 2, 3]
    assert choose_operating_point(points, front, max_accuracy_drop=1.0) == 3
    assert choose_operating_point(points, front, max_accuracy_drop=0.0) == 0
    assert choose_operating_point(points, front, max_accuracy_drop=10.0) == 2
    assert choose_operating_point(points, [], max_accuracy_drop=1.0) is None


def test_sweep_markdown_marks_the_front_and_the_choice(tmp_path: Path) -> None:
    from jobs.sweep import SweepOptions, plot_sweep

    points = [
        _p(
            0.92,
            2.0,
            500,
            sparsity="0",
            quantization="none",
            measured_sparsity=0.0,
            f1_macro=0.9,
            latency_ms_p99=3.0,
            size_bytes=600,
        ),
        _p(
            0.915,
            1.0,
            150,
            sparsity="0.5",
            quantization="int8",
            measured_sparsity=0.5,
            f1_macro=0.9,
            latency_ms_p99=2.0,
            size_bytes=200,
        ),
        {
            "sparsity": "0",
            "quantization": "qat-int8",
            "measured_sparsity": 0.0,
            "error": "tfmot cannot",
        },
    ]
    front = pareto_front(points)
    chosen = choose_operating_point(points, front, 1.0)
    for i, p in enumerate(points):
        p["pareto"], p["chosen"] = i in front, i == chosen
    results = {
        "options": vars(SweepOptions(model="optimized_cnn")),
        "points": points,
        "pareto": front,
        "chosen": chosen,
        "train_images": 10,
        "test_images": 5,
        "wall_seconds": 1.0,
        "loadavg_after": [1.0, 1.0, 1.0],
        "machine": {
            "model": "cpu",
            "cores": 2,
            "flags": [],
            "gpus": [],
            "loadavg": [1.0, 1.0, 1.0],
            "date": "today",
        },
    }
    text = sweep_markdown(results, "framecast sweep --model optimized_cnn")
    assert "| 0.5 | 0.500 | int8 | 91.50 |" in text and "**chosen**" in text
    assert "error: tfmot cannot" in text
    assert "Operating point: sparsity 0.5, quantization int8" in text
    plot_sweep(results, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_parts_table_splits_end_to_end_into_its_parts_and_the_rest() -> None:
    from cluster.bench.parts import parts_table

    start = 1_000_000_000_000
    labels = [
        {"status": "ok", "labeled_at_ns": start + k * 10**9,
         "timings_ms": {"broker": 2.0, "queue": 1.0, "decode": 3.0, "inference": 1.0,
                        "end_to_end": 10.0 + k}}
        for k in range(10)
    ] + [{"status": "error", "labeled_at_ns": start, "timings_ms": {}}]
    table = parts_table(labels, skip_s=4.0)
    assert table["frames"] == 6  # the first 4 s and the error left out
    assert table["broker"]["p50"] == 2.0
    assert table["end_to_end"]["p50"] == 16.5  # 14..19
    assert table["rest"]["p50"] == 9.5  # end-to-end minus 7 ms of parts
    assert parts_table([]) == {"frames": 0}


def test_bench_model_benches_the_shipped_optimized_model_not_a_retrained_older_one(
        tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[2] / "models" / "fashion_mnist_optimized"
    defaults = ["baseline_cnn", "mobilenet_v2", "optimized_cnn"]
    assert with_artifact_model(defaults, str(shipped)) == [
        "baseline_cnn", "mobilenet_v2", "optimized_fc128"]
    assert with_artifact_model(["optimized_cnn"], str(tmp_path)) == ["optimized_cnn"]
