"""`framecast train/evaluate` refuse bad flags and missing data with clear errors, fast.

The flags are TrainConfig's fields (jobs/config.py); a refused one is named as the field
(``train.prune: ...``) and exits 2. tests/unit/test_train_config.py checks the mapping itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.names import MODEL_NAMES

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
        (["--model", "resnet"], "train.model: Input should be 'baseline_cnn', 'mobilenet_v2', "
                                "'optimized_cnn', 'stream_cnn', 'camera_cnn', 'stream_sep', "
                                "'stream_dw', 'stream_fc', 'stream_deep', 'optimized_fc' or "
                                "'optimized_fc128' (got 'resnet')"),
        (["--prune", "cubic"], "train.prune: Input should be 'none', 'polynomial', 'constant' "
                               "or '2:4' (got 'cubic')"),
        (["--quantize", "int4"], "train.quantize: Input should be 'none', 'int8', 'float16' or "
                                 "'dynamic'"),
        (["--dataset", "imagenet"], "train.dataset: unknown dataset 'imagenet'"),
        (["--augment-policy", "heavy"], "train.augment_policy: Input should be 'standard' or "
                                        "'light' (got 'heavy')"),
        (["--epochs", "two"], "train.epochs: Input should be a valid integer"),
        (["--qat", "--quantize", "float16"], "train.qat: --qat needs --quantize int8"),
        (["--qat", "--qat-epochs", "0"], "train.qat_epochs: Input should be greater than 0"),
        (["--qat", "--model", "mobilenet_v2"], "tfmot cannot quantize mobilenet_v2"),
        (["--prune", "constant", "--target-sparsity", "0"],
         "train.target_sparsity: --target-sparsity must be in (0, 1)"),
        (["--target-sparsity", "0.5"],
         "train.target_sparsity: only for --prune polynomial or constant, not --prune none"),
        (["--workers", "4", "--batch-size", "2"],
         "train.batch_size: batch_size (2) must be >= workers (4)"),
        (["--weights", "imagenet"], "train.weights: --weights is only for mobilenet_v2"),
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


def test_submit_train_checks_the_training_flags_before_it_contacts_a_cluster(
    tmp_path: Path,
) -> None:
    # Nothing listens on port 1: exit 2 and the field named mean the flags were refused first.
    done = _run("submit", "train", "--address", "http://127.0.0.1:1", "--model", "optimized_cnn",
                "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path / "out"),
                "--prune", "cubic")
    assert done.returncode == 2, done.stderr
    assert "train.prune: Input should be" in done.stderr
    assert "cannot reach" not in done.stderr


def test_train_help_lists_the_choices_from_the_model() -> None:
    done = _run("train", "--help")
    assert done.returncode == 0, done.stderr
    # The model list is long enough to wrap inside the help table: each name in --model's rows.
    rows = done.stdout[done.stdout.index("--model"):done.stdout.index("--dataset")]
    assert "[baseline_cnn|mobilenet_v2|optimized_cnn|" in rows
    # (A wrap may fall just before a "|": the names are compared as words.)
    assert set(MODEL_NAMES) <= set(re.findall(r"[a-z0-9_]+", rows)), rows
    for choices in ("[none|polynomial|constant|2:4]", "[none|int8|float16|dynamic]"):
        assert choices in done.stdout, choices  # COLUMNS=200: one line each


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
