"""The local multi-node Ray cluster (issue 20 items 1-2): nodes, placement, classifiers on Ray.

The session cluster (tests/conftest.py ``ray_cluster``) is the head plus two worker nodes;
``framecast up --nodes 3`` is also run end to end in a home of its own.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psutil
import pytest

from cluster.processes import free_port
from serving.config import ServeSettings
from streams.config import KafkaSettings
from tests.conftest import LocalCluster, run_cli
from tests.streaming import (
    labels_of,
    read_topic,
    send_arrow_frames,
    stream_run_argv,
    stream_run_env,
    topics,
)

pytestmark = pytest.mark.timeout(600)


def test_session_cluster_has_three_nodes(ray_cluster: LocalCluster) -> None:
    import ray

    ids = ray_cluster.node_ids()
    assert len(set(ids)) == 3
    assert [w.name for w in ray_cluster.workers] == ["worker-1", "worker-2"]
    connected = ray.is_initialized()
    if not connected:
        ray.init(address=ray_cluster.head.address, log_to_driver=False)
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    finally:
        if not connected:
            ray.shutdown()
    assert set(ids) <= set(nodes)
    labels = {nodes[i]["Labels"].get("framecast.node") for i in ids}
    assert labels == {"head", "worker-1", "worker-2"}
    assert all(nodes[i]["Resources"]["framecast_node"] == 1.0 for i in ids)


def test_three_replicas_land_on_three_nodes(
    ray_cluster: LocalCluster, serve_port: int, served_artifact: Path
) -> None:
    from serving.deploy import deploy, shutdown, status

    settings = ServeSettings(
        app_name="spread", route_prefix="/spread", http_port=serve_port, num_cpus=0.5,
        min_replicas=3, max_replicas=3,
    )
    deploy(served_artifact, settings, address=None, namespace="framecast-tests", timeout_s=300)
    try:
        report = status(address=None, namespace="framecast-tests")
        replicas = report["spread"]["deployments"]["Classifier"]["replica_nodes"]
        assert len(replicas) == 3
        assert len({r["node_id"] for r in replicas}) == 3
        assert {r["node_id"] for r in replicas} <= set(ray_cluster.node_ids())
    finally:
        shutdown("spread", address=None, namespace="framecast-tests")


def test_a_per_node_cap_keeps_a_replacement_replica_off_occupied_nodes(
    ray_cluster: LocalCluster, serve_port: int, served_artifact: Path
) -> None:
    """Serve's SPREAD alone put a crashed replica's replacement beside another replica in 2
    of 3 tries here; max_replicas_per_node=1 puts it on the node that freed up."""
    import ray

    from cluster.processes import wait_until
    from serving.deploy import deploy, shutdown, status

    settings = ServeSettings(
        app_name="capped", route_prefix="/capped", http_port=serve_port, num_cpus=0.5,
        min_replicas=3, max_replicas=3, max_replicas_per_node=1,
    )

    def replicas() -> list[dict[str, object]]:
        report = status(address=None, namespace="framecast-tests")
        return list(report["capped"]["deployments"]["Classifier"]["replica_nodes"])

    deploy(served_artifact, settings, address=None, namespace="framecast-tests", timeout_s=300)
    try:
        before = replicas()
        assert len({r["node_id"] for r in before}) == 3
        victim = before[0]
        ray.kill(
            ray.get_actor(f"SERVE_REPLICA::capped#Classifier#{victim['replica_id']}", "serve"),
            no_restart=True,
        )
        assert wait_until(
            lambda: len(now := replicas()) == 3
            and victim["replica_id"] not in {r["replica_id"] for r in now},
            timeout=180, interval=0.5,
        )
        after = replicas()
        assert len({r["node_id"] for r in after}) == 3
    finally:
        shutdown("capped", address=None, namespace="framecast-tests")


def test_stream_run_on_ray_labels_every_frame_from_actors_on_several_nodes(
    ray_cluster: LocalCluster,
    kafka_settings: KafkaSettings,
    stream_app: str,
    tmp_path: Path,
) -> None:
    config = topics(kafka_settings, partitions=3)
    sent = send_arrow_frames(kafka_settings, config.frames_topic, streams=6, per_stream=20)
    argv = stream_run_argv(
        kafka_settings, config, stream_app, ray_cluster.head, tmp_path, "--on-ray", "3",
        "--max-frames", str(len(sent)), idle_exit_s=60,
    )
    result = subprocess.run(
        argv, env=stream_run_env(), capture_output=True, text=True, timeout=420, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    totals = json.loads(result.stdout.strip().splitlines()[-1])
    assert totals["actors"] == 3
    assert len(totals["nodes"]) > 1
    assert set(totals["nodes"]) <= set(ray_cluster.node_ids())
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, expected=len(sent)))
    assert {(label.stream_id, label.frame_index) for label in labels} == {
        (s, i) for s, i, _ in sent
    }
    assert totals["labelled"] >= len(sent)


def _processes_naming(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info.get("cmdline") or []):
            found.append(proc.pid)
    return found


def test_up_nodes_3_status_lists_them_and_down_leaves_nothing(tmp_path: Path) -> None:
    env = {
        "FRAMECAST_RAY_GCS_PORT": str(free_port()),
        "FRAMECAST_RAY_DASHBOARD_PORT": str(free_port()),
        "FRAMECAST_RAY_NUM_CPUS": "1",
        "FRAMECAST_RAY_WORKER_NUM_CPUS": "1",
        "FRAMECAST_RAY_OBJECT_STORE_MB": "128",
    }
    head_dir = str(tmp_path / "no-head-yet")
    try:
        started = run_cli("up", "--no-kafka", "--nodes", "3", home=tmp_path, env=env, timeout=420)
        assert started.returncode == 0, started.stderr
        assert "ray started" in started.stdout
        assert "2 worker node(s)" in started.stdout
        again = run_cli("up", "--no-kafka", "--nodes", "3", home=tmp_path, env=env, timeout=420)
        assert again.returncode == 0, again.stderr
        assert "ray running" in again.stdout
        assert "ray-workers running" in again.stdout
        head_dir = json.loads((tmp_path / "ray" / "head.json").read_text())["temp_dir"]
        report = json.loads(run_cli("status", "--json", home=tmp_path, env=env).stdout)
        nodes = report["ray"]["nodes"]
        assert len(nodes) == 3
        assert [n["is_head"] for n in nodes] == [True, False, False]
        assert all(n["alive"] for n in nodes)
        assert len({n["id"] for n in nodes}) == 3
        assert all(isinstance(n["node_manager_port"], int) for n in nodes)
        assert [n["name"] for n in nodes] == ["head", "worker-1", "worker-2"]
        assert [n["resources"]["CPU"] for n in nodes] == [1.0, 1.0, 1.0]
        assert report["ray"]["resources"]["CPU"] == 3.0
    finally:
        stopped = run_cli("down", home=tmp_path, env=env)
    assert "ray-workers stopped" in stopped.stdout, stopped.stderr
    assert "ray stopped" in stopped.stdout, stopped.stderr
    assert _processes_naming(head_dir) == []


def test_kill_worker_is_a_crash_and_add_worker_joins_a_new_node(tmp_path: Path) -> None:
    """The session fixture's node-fault API on a small cluster of its own (head + 1 worker)."""
    from cluster.processes import wait_until
    from cluster.ray_head import LocalRayHead
    from cluster.ray_nodes import LocalRayCluster
    from cluster.settings import RaySettings
    from tests.conftest import local_ray_head

    with local_ray_head(tmp_path, num_cpus=1, in_process=False) as (info, _env):
        head = LocalRayHead(tmp_path, RaySettings(gcs_port=info.gcs_port, object_store_mb=128))
        cluster = LocalCluster(head, info, worker_cpus=1)
        LocalRayCluster(head).start_workers(info.address, nodes=2)
        first = cluster.node_ids()
        assert len(first) == 2
        worker_dir = cluster.workers[0].temp_dir
        killed = cluster.kill_worker(1)
        assert killed
        assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
                   for pid in killed)
        assert _processes_naming(worker_dir + "/") == []
        assert cluster.node_ids() == first[:1]
        assert cluster.workers == []
        added = cluster.add_worker()
        assert added.name == "worker-2"
        assert wait_until(lambda: len(cluster.node_ids()) == 2, timeout=60)
        assert cluster.node_ids()[1] not in first
        LocalRayCluster(head).stop_workers()
    assert _processes_naming(info.temp_dir) == []  # head and worker dirs (<head dir>-w<i>)
