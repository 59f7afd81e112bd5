"""`framecast train/evaluate` refuse bad flags and missing data with clear errors, fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FRAMECAST = Path(sys.executable).parent / "framecast"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [str(FRAMECAST), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--prune", "cubic"], "unknown prune schedule 'cubic'"),
        (["--quantize", "int4"], "unknown quantization 'int4'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--qat", "--quantize", "float16"], "--qat needs --quantize int8"),
        (["--qat", "--qat-epochs", "0"], "--qat-epochs"),
        (["--qat", "--model", "mobilenet_v2"], "tfmot cannot quantize mobilenet_v2"),
        (["--prune", "constant", "--target-sparsity", "0"], "--target-sparsity must be in (0, 1)"),
    ],
)
def test_train_rejects_bad_flags(flags: list[str], message: str, tmp_path: Path) -> None:
    base = {
        "--model": "optimized_cnn",
        "--dataset": "synthetic",
        "--epochs": "1",
        "--out": str(tmp_path / "out"),
    }
    args = ["train"]
    for key, value in base.items():
        if key not in flags:
            args += [key, value]
    done = _run(*args, *flags)
    assert done.returncode == 2, done.stderr
    assert message in " ".join(done.stderr.split())


def test_train_missing_folder_dataset_is_a_clear_error(tmp_path: Path) -> None:
    done = _run(
        "train",
        "--model",
        "optimized_cnn",
        "--dataset",
        f"folder:{tmp_path}/none",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "out"),
    )
    assert done.returncode == 1
    assert "does not exist" in done.stderr
    assert not (tmp_path / "out").exists()


def test_train_refuses_to_overwrite_a_non_artifact_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    done = _run(
        "train",
        "--model",
        "optimized_cnn",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "out"),
    )
    assert done.returncode == 2
    assert "refusing to overwrite" in done.stderr
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_evaluate_missing_artifact_is_a_clear_error(tmp_path: Path) -> None:
    done = _run("evaluate", str(tmp_path / "nope"), "--json")
    assert done.returncode == 1
    assert "artifact directory does not exist" in done.stderr
    assert done.stdout == ""
