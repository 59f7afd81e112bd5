"""`framecast bench model|scaling` and `framecast sweep`, run as a user would, on small data.

The numbers are not checked (the machine is shared and noisy); what is checked is that
every export and every sweep point is measured or says why not, and that the reports exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.processes import free_port
from jobs.variants import EXPORTS
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def test_bench_model_quick_measures_every_export(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = run_cli(
        "bench",
        "model",
        "--quick",
        "--dataset",
        "synthetic",
        "--models",
        "optimized_cnn",
        "--epochs",
        "1",
        "--limit",
        "256",
        "--test-limit",
        "64",
        "--out",
        str(out),
        home=tmp_path / "home",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "bench-model.json").read_text())
    rows = {r["export"]: r for r in data["rows"]}
    assert list(rows) == list(EXPORTS)
    for export, row in rows.items():
        assert not row.get("error"), f"{export}: {row.get('error')}"
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["latency_ms_p50"] > 0 and row["latency_ms_p99"] >= row["latency_ms_p50"]
        assert row["throughput_ips"] > 0 and row["size_bytes"] > 0
        assert row["efficiency_latency_pct"] > 0
    # The same float weights everywhere: the float exports agree on every test image.
    assert rows["litert-float32"]["accuracy"] == rows["onnxruntime"]["accuracy"]
    assert rows["keras"]["accuracy"] == rows["saved_model"]["accuracy"]
    (model,) = data["models"]
    assert model["source"].startswith("trained here") and model["macs"] > 0
    assert len(data["machine"]["loadavg"]) == 3
    text = (out / "bench-model.md").read_text()
    assert "bench model --quick --dataset synthetic" in text and "| onnxruntime |" in text
    assert (out / "bench-model.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_quick_writes_a_pareto_report(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep",
        "--model",
        "optimized_cnn",
        "--dataset",
        "synthetic",
        "--quick",
        "--limit",
        "256",
        "--test-limit",
        "64",
        "--latency-samples",
        "10",
        "--sparsities",
        "0,2:4",
        "--quants",
        "none,int8",
        "--out",
        str(out),
        home=tmp_path / "home",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "sweep.json").read_text())
    assert [(p["sparsity"], p["quantization"]) for p in data["points"]] == [
        ("0", "none"),
        ("0", "int8"),
        ("2:4", "none"),
        ("2:4", "int8"),
    ]
    assert all(not p.get("error") for p in data["points"])
    assert data["pareto"] and data["chosen"] in data["pareto"]
    assert [p["chosen"] for p in data["points"]].count(True) == 1
    two_four = next(t for t in data["trainings"] if t["sparsity"] == "2:4")
    assert two_four["m_by_n"] and two_four["measured_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert "operating point" in result.stdout
    assert "**chosen**" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_scaling_quick_runs_classifier_processes_in_one_group(tmp_path: Path) -> None:
    # Its own embedded stack (started and stopped by the command), two `stream run` processes.
    out = tmp_path / "bench"
    result = run_cli(
        "bench",
        "scaling",
        "--quick",
        "--replicas",
        "1",
        "--classifiers",
        "2",
        "--out",
        str(out),
        home=tmp_path / "home",
        timeout=900,
        env={
            "FRAMECAST_KAFKA_LIBS": str(REPO / ".framecast" / "kafka" / "libs"),
            "FRAMECAST_KAFKA_EMBEDDED_PORT": str(free_port()),
            "FRAMECAST_RAY_GCS_PORT": str(free_port()),
            "FRAMECAST_RAY_DASHBOARD_PORT": str(free_port()),
            "FRAMECAST_SERVE_HTTP_PORT": str(free_port()),
        },
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "bench-scaling.json").read_text())
    (run,) = data["runs"]
    assert (run["replicas"], run["classifiers"]) == (1, 2)
    for mode in ("flat_out", "offered"):
        measured = run[mode]
        assert measured["labels"] == measured["frames"] > 0  # every frame labelled once
        assert sum(measured["labelled_per_classifier"]) == measured["frames"]
        assert len(measured["labelled_per_classifier"]) == 2
        assert measured["sustained_fps"] > 0 and measured["p99_ms"] >= measured["p50_ms"] > 0
    # The offered run had 8 cameras on 4 partitions: both members got partitions.
    assert all(n > 0 for n in run["offered"]["labelled_per_classifier"])
    assert data["extrapolation"]["replicas_needed"]["5000"] >= 1
    assert "| 1 (1) | 2 |" in (out / "bench-scaling.md").read_text()
    assert (out / "bench-scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    result = run_cli(
        "sweep",
        "--model",
        "optimized_cnn",
        "--sparsities",
        "0.3",
        "--out",
        str(tmp_path),
        home=tmp_path / "home",
    )
    assert result.returncode == 2 and "--sparsities" in result.stderr
    result = run_cli("bench", "nonsense", home=tmp_path / "home")
    assert result.returncode == 2 and "unknown bench" in result.stderr
    result = run_cli("bench", "model", "--models", "resnet", home=tmp_path / "home")
    assert result.returncode == 2 and "resnet" in result.stderr
    result = run_cli("bench", "scaling", "--classifiers", "1,9", home=tmp_path / "home")
    assert result.returncode == 2 and "--classifiers" in result.stderr
