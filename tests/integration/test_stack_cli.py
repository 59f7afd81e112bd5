"""`framecast up / down / status` as a user runs them, against real processes."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from cluster.processes import free_port, wait_until
from streams.config import KafkaSettings
from tests.conftest import run_cli
from tests.integration.test_kafka_broker import consume_all, produce


def _broker_pids(home: Path) -> list[int]:
    marker = str((home / "kafka" / "server.properties").resolve())
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if marker in " ".join(p.info.get("cmdline") or [])
    ]


@pytest.fixture
def kafka_home(tmp_path: Path) -> dict[str, str]:
    """Env for a CLI stack with its own broker on a free port, sharing the jar cache."""
    from tests.conftest import REPO

    return {
        "FRAMECAST_KAFKA_LIBS": str(REPO / ".framecast" / "kafka" / "libs"),
        "FRAMECAST_KAFKA_EMBEDDED_PORT": str(free_port()),
    }


def test_up_twice_then_down_twice_is_harmless_and_leaves_no_process(
    tmp_path: Path, kafka_home: dict[str, str]
) -> None:
    first = run_cli("up", "--no-ray", home=tmp_path, env=kafka_home)
    assert first.returncode == 0, first.stderr
    assert "kafka started" in first.stdout
    pids = _broker_pids(tmp_path)
    assert len(pids) == 1

    second = run_cli("up", "--no-ray", home=tmp_path, env=kafka_home)
    assert second.returncode == 0, second.stderr
    assert "kafka running" in second.stdout
    assert _broker_pids(tmp_path) == pids

    stopped = run_cli("down", home=tmp_path, env=kafka_home)
    assert stopped.returncode == 0, stopped.stderr
    assert "kafka stopped" in stopped.stdout
    assert _broker_pids(tmp_path) == []
    assert (
        not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    )

    again = run_cli("down", home=tmp_path, env=kafka_home)
    assert again.returncode == 0
    assert "kafka not running" in again.stdout


def test_data_survives_a_broker_restart(tmp_path: Path, kafka_home: dict[str, str]) -> None:
    port = kafka_home["FRAMECAST_KAFKA_EMBEDDED_PORT"]
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
    try:
        assert run_cli("up", "--no-ray", home=tmp_path, env=kafka_home).returncode == 0
        applied = run_cli("topics", "apply", home=tmp_path, env=kafka_home)
        assert applied.returncode == 0, applied.stderr
        assert "frames: created" in applied.stdout
        sent = produce(settings, "frames", 40)
        assert run_cli("down", home=tmp_path, env=kafka_home).returncode == 0
        restarted = run_cli("up", "--no-ray", home=tmp_path, env=kafka_home)
        assert "kafka started" in restarted.stdout, restarted.stderr
        got = consume_all(settings, "frames", 40)
        assert sorted((m.key, m.value) for m in got) == sorted(sent)
        described = run_cli("topics", "describe", "frames", "--json", home=tmp_path, env=kafka_home)
        assert json.loads(described.stdout)[0]["partitions"] == 4
    finally:
        down = run_cli("down", home=tmp_path, env=kafka_home)
    # A SIGKILLed JVM can take a moment to go; a broker left running would stay.
    wait_until(lambda: not _broker_pids(tmp_path), timeout=30)
    assert _broker_pids(tmp_path) == [], down.stdout + down.stderr


def test_status_json_against_existing_clusters_redacts_secrets(
    tmp_path: Path, kafka_settings: KafkaSettings, ray_head
) -> None:  # type: ignore[no-untyped-def]
    secret = "s3cr3t-pw-xyz"
    result = run_cli(
        "--bootstrap-servers",
        str(kafka_settings.bootstrap_servers),
        "--ray-address",
        ray_head.address,
        "status",
        "--json",
        home=tmp_path,
        env={"FRAMECAST_KAFKA_SASL_PASSWORD": secret},
    )
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["kafka"]["bootstrap_servers"] == kafka_settings.bootstrap_servers
    assert report["kafka"]["mode"] == "external"
    assert report["kafka"]["healthy"] is True
    assert report["ray"]["address"] == ray_head.address
    assert report["ray"]["resources"]["CPU"] == 6.0  # the session cluster: 3 nodes x 2
    assert report["serve"]["http_url"] == "http://127.0.0.1:8000"
    assert report["settings"]["kafka"]["sasl_password"] == "**********"


def test_ray_up_status_down_leaves_no_ray_process(tmp_path: Path) -> None:
    env = {
        "FRAMECAST_RAY_GCS_PORT": str(free_port()),
        "FRAMECAST_RAY_DASHBOARD_PORT": str(free_port()),
    }
    temp_marker = "framecast-ray-"
    try:
        started = run_cli("up", "--no-kafka", "--num-cpus", "1", home=tmp_path, env=env)
        assert started.returncode == 0, started.stderr
        assert "ray started" in started.stdout
        status = json.loads(run_cli("status", "--json", home=tmp_path, env=env).stdout)
        assert status["ray"]["running"] is True
        assert status["ray"]["resources"]["CPU"] == 1.0
        assert status["kafka"]["running"] is False
        head_dir = json.loads((tmp_path / "ray" / "head.json").read_text())["temp_dir"]
        assert temp_marker in head_dir
    finally:
        stopped = run_cli("down", home=tmp_path, env=env)
    assert "ray stopped" in stopped.stdout, stopped.stderr
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if head_dir in " ".join(p.info.get("cmdline") or [])
    ]
    assert leftovers == []
