"""Real Ray Train (V2) with 2 workers: pruning + int8 export, resume after a worker failure,
and `framecast evaluate --json` on the artifact it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.train import TrainConfig, train_artifact
from serving.artifacts import ArtifactError, load_artifact

FRAMECAST = Path(sys.executable).parent / "framecast"
METRIC_KEYS = {
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "latency_ms_p50",
    "latency_ms_p99",
    "throughput_ips",
    "size_bytes",
    "gzip_bytes",
    "param_count",
    "sparsity",
    "peak_rss_mb",
    "samples",
}


@pytest.fixture(scope="module")
def artifact(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Train 3 epochs on 2 workers with constant pruning; every worker fails once after epoch 1.

    It runs on the session Ray head through this process's driver connection (serve_port
    makes it), beside the Serve apps of other modules: the driver is never dropped or
    switched to another Ray instance (doing so once left later modules deploying to a stray
    in-process Ray).
    """
    root = tmp_path_factory.mktemp("train")
    config = TrainConfig(
        model="optimized_cnn",
        dataset="synthetic",
        epochs=3,
        out=str(root / "artifact"),
        limit=256,
        test_limit=160,
        workers=2,
        cpus_per_worker=1,
        prune="constant",
        target_sparsity=0.5,
        quantize="int8",
        batch_size=32,
        max_failures=1,
        storage_path=str(root / "ray"),
        augment=False,
    )
    epochs: list[dict] = []
    metrics = train_artifact(config, on_epoch=epochs.append, fail_after_epoch=1)
    return Path(config.out), {"metrics": metrics, "epochs": epochs}


def test_artifact_is_verified_pruned_and_int8(artifact: tuple[Path, dict]) -> None:
    directory, outcome = artifact
    loaded = load_artifact(directory)
    manifest = loaded.manifest
    assert manifest.training.workers == 2
    assert manifest.optimization.prune_schedule == "constant"
    assert abs(manifest.optimization.measured_sparsity - 0.5) <= 0.02
    assert all(abs(v - 0.5) <= 0.02 for v in manifest.optimization.layer_sparsity.values())
    assert manifest.optimization.calibration_sha256 is not None
    assert manifest.input.dtype == "int8"
    assert {"model.tflite", "metrics.json", "saved_model/saved_model.pb"} <= set(manifest.files)
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert metrics["samples"] == 160
    # int8 agrees with float on most of the test sample (same predictions <=> close accuracy).
    assert abs(metrics["accuracy"] - metrics["float"]["accuracy"]) <= 0.1
    assert outcome["metrics"]["accuracy"] == metrics["accuracy"]


def test_training_resumed_from_checkpoint_after_worker_failure(artifact: tuple[Path, dict]) -> None:
    directory, outcome = artifact
    training = load_artifact(directory).manifest.training
    assert training.resumed_from_epoch == 1
    assert training.epochs == 3
    assert [int(h["epoch"]) for h in training.history] == [1, 2, 3]
    # Epoch 1 was reported before the failure, 2-3 after the restart (not 1-3 again).
    assert [int(r["epoch"]) for r in outcome["epochs"]] == [1, 2, 3]


def test_cli_evaluate_json_and_tamper_refusal(artifact: tuple[Path, dict], tmp_path: Path) -> None:
    directory, _ = artifact
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [str(FRAMECAST), "evaluate", str(directory), "--limit", "100", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert set(metrics) >= METRIC_KEYS
    assert metrics["samples"] == 100
    assert metrics["runtime"] == "tflite"
    assert np.array(metrics["confusion_matrix"]).sum() == 100

    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(directory), str(tampered)], check=True)
    raw = bytearray((tampered / "model.tflite").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tampered / "model.tflite").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tampered)
    done = subprocess.run(
        [str(FRAMECAST), "evaluate", str(tampered), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert done.returncode == 1
    assert "refusing to load" in done.stderr
    assert done.stdout == ""


def test_an_artifact_exported_again_from_the_runs_last_checkpoint(
    artifact: tuple[Path, dict], tmp_path: Path
) -> None:
    directory, _ = artifact
    runs = sorted(
        p for p in (directory.parent / "ray").glob("optimized_cnn-*/checkpoint_*") if p.is_dir()
    )
    assert runs, "the run kept no checkpoint"
    config = TrainConfig(
        model="optimized_cnn",
        dataset="synthetic",
        epochs=3,
        out=str(tmp_path / "again"),
        limit=256,
        test_limit=160,
        workers=2,
        prune="constant",
        target_sparsity=0.5,
        quantize="int8",
        batch_size=32,
        augment=False,
        from_checkpoint=str(runs[-1]),
    )
    train_artifact(config)  # no Ray Train run: restore, strip, export, evaluate
    first, again = load_artifact(directory).manifest, load_artifact(tmp_path / "again").manifest
    assert again.training.epochs == first.training.epochs == 3
    assert again.training.started_at <= again.training.finished_at
    assert abs(again.optimization.measured_sparsity - 0.5) <= 0.02
    # The same weights: the float SavedModel's accuracy is the same on the same test sample.
    first_metrics = json.loads((directory / "metrics.json").read_text())
    again_metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again_metrics["float"]["accuracy"] == first_metrics["float"]["accuracy"]
    with pytest.raises(ValueError, match="not a framecast training checkpoint"):
        train_artifact(config.model_copy(update={"from_checkpoint": str(tmp_path)}))

