"""`framecast demo` as a user runs it: its own broker and Ray head, every frame accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from cluster.kafka_broker import EmbeddedKafka
from cluster.processes import free_port
from cluster.ray_head import LocalRayHead, RayHeadInfo
from cluster.settings import RaySettings
from tests.conftest import REPO, run_cli


def _processes_of(markers: tuple[str, ...]) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info.get("cmdline") or [])
        if any(marker in command for marker in markers):
            found.append(f"{process.info['pid']}: {command[:200]}")
    return found


def test_demo_labels_every_frame_writes_its_report_and_leaves_no_process(tmp_path: Path) -> None:
    env = {
        "FRAMECAST_KAFKA_LIBS": str(REPO / ".framecast" / "kafka" / "libs"),
        "FRAMECAST_KAFKA_EMBEDDED_PORT": str(free_port()),
        "FRAMECAST_RAY_GCS_PORT": str(free_port()),
        "FRAMECAST_RAY_DASHBOARD_PORT": str(free_port()),
        "FRAMECAST_RAY_NUM_CPUS": "2",
        "FRAMECAST_SERVE_HTTP_PORT": str(free_port()),
    }
    markers = (str(tmp_path), str(LocalRayHead(tmp_path, RaySettings()).temp_dir))
    try:
        done = run_cli(
            "demo", "--preset", "fashion-mnist", "--cameras", "3", "--fps", "20", "--seconds", "4",
            home=tmp_path, env=env, timeout=420,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        leftovers = _processes_of(markers)
        if leftovers:  # stop them for the next tests, then fail
            run_cli("down", home=tmp_path, env=env)
    assert leftovers == []

    report_dir = tmp_path / "reports" / "demo"
    report = json.loads((report_dir / "demo.json").read_text())
    assert report["frames_planned"] == 3 * 80
    assert report["frames_produced"] == 240
    assert report["labels"] == 240  # no deadline: every frame labelled
    assert report["dropped_deadline"] == 0
    assert report["dlq"] == 0
    assert report["unaccounted"] == 0
    assert report["model"]["runtime"] == "litert"
    # The synthetic garments move across a 32 px frame; the shipped model is ~93 % on still ones.
    assert report["online_accuracy"] > 0.6
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert sum(w["frames"] for w in report["latency_ms_by_window"]) == 240
    assert report["preset"] == "fashion-mnist"
    assert report["decode"]["p50_ms"] > 0  # the replicas decode each PNG frame
    assert (report_dir / "latency_histogram.png").stat().st_size > 1000
    assert "| frames produced / labelled | 240 / 240 |" in (report_dir / "demo.md").read_text()
    assert "demo summary" in done.stdout


def test_scenes_preset_labels_640x480_rgb_frames_on_a_running_stack(
        kafka_broker: EmbeddedKafka, ray_head: RayHeadInfo, serve_port: int,
        tmp_path: Path) -> None:
    """The default preset (640x480 RGB JPEG scenes, models/scenes), lean: on the session's
    broker and Ray cluster (external to the demo, so it starts and stops neither), 2 cameras
    for 3 s, under its own Serve app (deleted at the end)."""
    env = {
        "FRAMECAST_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "FRAMECAST_RAY_ADDRESS": ray_head.address,
        "FRAMECAST_SERVE_HTTP_PORT": str(serve_port),
        "FRAMECAST_SERVE_APP_NAME": "demo-scenes",
        "FRAMECAST_SERVE_ROUTE_PREFIX": "/demo-scenes",
        "FRAMECAST_DASHBOARD_PORT": str(free_port()),
    }
    done = run_cli("demo", "--cameras", "2", "--fps", "10", "--seconds", "3",
                   home=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "demo" / "demo.json").read_text())
    assert (report["preset"], report["source"], report["encoding"], report["frame_size"]) == (
        "scenes", "scenes", "jpeg", "640x480")
    assert report["model"]["runtime"] == "litert"
    assert report["artifact"].endswith("models/scenes")
    assert report["frames_produced"] == report["labels"] == 60
    assert report["unaccounted"] == 0
    assert report["online_accuracy"] is not None  # ground truth in every scenes frame
    assert report["decode"]["p50_ms"] > 0  # the replicas decoded the JPEGs
    assert report["cameras_prerender_s"] > 0
