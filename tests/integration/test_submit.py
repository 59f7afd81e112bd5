"""`framecast submit ...` against a real local Ray head, through the Ray Jobs API.

A small training run (synthetic data, one epoch) is submitted as a Ray job with the
repository as its working_dir; the job trains on Ray Train and writes a verified artifact.
Then status/logs of that job, a job stopped through `submit stop`, and a job that fails.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import submit
from cluster.ray_head import RayHeadInfo
from serving.artifacts import load_artifact
from tests.conftest import local_ray_head, run_cli

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def submit_head(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RayHeadInfo, dict[str, str]]]:
    """A Ray head of this module's own: the session head is busy with Serve replicas.

    This process may hold a driver connected to the session head, so the new head's token
    goes only to the CLI subprocesses and to the Jobs client, never into this process's env.
    """
    with local_ray_head(tmp_path_factory.mktemp("submit-ray-home"), in_process=False) as head:
        yield head


@pytest.fixture(scope="module")
def ray_head(submit_head: tuple[RayHeadInfo, dict[str, str]]) -> RayHeadInfo:
    return submit_head[0]


@pytest.fixture(scope="module")
def head_env(submit_head: tuple[RayHeadInfo, dict[str, str]]) -> dict[str, str]:
    return submit_head[1]


def _token(env: dict[str, str]) -> str:
    return Path(env["RAY_AUTH_TOKEN_PATH"]).read_text(encoding="utf-8").strip()


@pytest.fixture(scope="module")
def trained(
    ray_head: RayHeadInfo, head_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, str]:
    """(home, artifact dir, CLI stdout) of one `submit train` run."""
    home = tmp_path_factory.mktemp("submit-home")
    out = home / "artifact"
    result = run_cli(
        "submit",
        "train",
        "--address",
        ray_head.dashboard_url,
        "--model",
        "optimized_cnn",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--test-limit",
        "32",
        "--batch-size",
        "32",
        "--workers",
        "1",
        "--quantize",
        "int8",
        "--out",
        str(out),
        home=home,
        env=head_env,
        timeout=360,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return home, out, result.stdout


def _job_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("submitted "):
            return line.split()[1]
    raise AssertionError(f"no job id in:\n{stdout}")


def test_submitted_training_job_produces_a_verified_artifact(trained: tuple[Path, Path, str]):
    home, out, stdout = trained
    assert "SUCCEEDED" in stdout
    assert f"artifact (on this machine): {out}" in stdout
    assert "-m cluster.cli train" in stdout  # the job ran the CLI's own train command
    artifact = load_artifact(out)  # checksums of every file verified
    assert artifact.manifest.training.dataset == "synthetic"
    assert (out / "model.tflite").is_file()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["accuracy"] <= 1.0
    book = json.loads((home / "submit" / "jobs.json").read_text(encoding="utf-8"))
    assert book[_job_id(stdout)]["artifact"] == str(out)


def test_status_and_logs_find_the_job_again(
    trained: tuple[Path, Path, str], head_env: dict[str, str]
):
    home, out, stdout = trained
    job_id = _job_id(stdout)
    status = run_cli("submit", "status", job_id, home=home, env=head_env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"{job_id}: SUCCEEDED" in status.stdout
    assert str(out) in status.stdout
    logs = run_cli("submit", "logs", job_id, home=home, env=head_env, timeout=60)
    assert logs.returncode == 0, logs.stderr
    assert "training optimized_cnn on synthetic" in logs.stdout


def test_stop_ends_a_running_job(ray_head: RayHeadInfo, head_env: dict[str, str], tmp_path: Path):
    client = submit.connect(ray_head.dashboard_url, token=_token(head_env))
    job_id = submit.submit_job(
        client, "python -c 'import time; time.sleep(300)'", {"env_vars": {"X": "1"}}
    )
    # No address recorded for this job: `submit stop` finds the cluster through RAY_ADDRESS.
    result = run_cli(
        "submit",
        "stop",
        job_id,
        home=tmp_path,
        env={**head_env, "RAY_ADDRESS": ray_head.dashboard_url},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STOPPED" in result.stdout
    assert submit.status_name(client.get_job_status(job_id)) == "STOPPED"


def _submit_train(
    address: str, home: Path, env: dict[str, str] | None, *flags: str, dataset: str = "synthetic"
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "submit",
        "train",
        "--address",
        address,
        "--model",
        "optimized_cnn",
        "--dataset",
        dataset,
        "--epochs",
        "1",
        *flags,
        home=home,
        env=env,
        timeout=180,
    )


def test_bad_training_flags_are_refused_before_anything_is_submitted(
    ray_head: RayHeadInfo, head_env: dict[str, str], tmp_path: Path
):
    result = _submit_train(
        ray_head.dashboard_url,
        tmp_path,
        head_env,
        "--out",
        str(tmp_path / "never"),
        "--quantize",
        "int4",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "train.quantize: Input should be" in result.stderr
    assert "submitted" not in result.stdout
    assert not (tmp_path / "submit" / "jobs.json").exists()


def test_a_failing_training_job_is_reported_as_failed(
    ray_head: RayHeadInfo, head_env: dict[str, str], tmp_path: Path
):
    # A folder dataset is checked where the job runs (it may be on the cluster's volume).
    missing = tmp_path / "no_such_folder"
    result = _submit_train(
        ray_head.dashboard_url,
        tmp_path,
        head_env,
        "--out",
        str(tmp_path / "never"),
        dataset=f"folder:{missing}",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout
    assert "does not exist" in result.stdout
    assert not (tmp_path / "never").exists()


def test_unknown_job_and_bad_address_are_plain_errors(
    ray_head: RayHeadInfo, head_env: dict[str, str], tmp_path: Path
):
    result = run_cli(
        "submit",
        "status",
        "raysubmit_nope",
        home=tmp_path,
        env={**head_env, "RAY_ADDRESS": ray_head.dashboard_url},
        timeout=60,
    )
    assert result.returncode == 1
    assert "raysubmit_nope" in result.stderr
    result = _submit_train("ray://127.0.0.1:10001", tmp_path, None, "--out", "/tmp/x")
    assert result.returncode == 1
    assert "dashboard" in result.stderr
