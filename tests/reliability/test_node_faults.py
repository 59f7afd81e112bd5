"""Ray node faults (issue 20): a worker node SIGKILLed under a running stream, and in training.

The session Ray cluster has three nodes on this machine (``tests/conftest.py::ray_cluster``):
the head and two workers. A node's loss is a SIGKILL of its raylet and of every worker
process on it - a crash, no drain. Each test adds a node back afterwards, so that later
tests see three again.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.config import KafkaSettings
from tests.conftest import LocalCluster
from tests.reliability.conftest import Record, Replicas, reliability_settings
from tests.streaming import (
    Feeder,
    LabelProbe,
    labels_of,
    read_topic,
    stream_run_argv,
    stream_run_env,
    tally,
    topics,
    wait_for_start,
)

pytestmark = pytest.mark.timeout(420)

SPREAD_APP = "nodefaults"
# Ray Train V2 names the checkpoints it registered here, under storage_path/run_name.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
REPLICAS = 3
# At most two per node: the three replicas then cover at least two nodes, so one of them is
# a worker node (Serve's own spreading is best effort: a loaded run put two on one node and
# left the third node empty), and after a node's loss the survivors still hold all three.
PER_NODE = 2


def _wait(condition: Callable[[], Any], what: str, timeout_s: float = 180) -> float:
    """Poll condition until true; seconds it took (fails naming ``what`` past timeout_s)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.25)
    return time.monotonic() - started


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _worker_nodes(cluster: LocalCluster) -> dict[str, int]:
    """The running worker nodes: Ray node id -> the node's index for kill_worker."""
    return {str(cluster.node_id(w.index)): w.index for w in cluster.workers}


def _kill_worker_node(cluster: LocalCluster, node_id: str) -> None:
    """SIGKILL the worker node with this Ray node id (its raylet and every process of it)."""
    cluster.kill_worker(_worker_nodes(cluster)[node_id])


@pytest.fixture
def three_nodes(ray_cluster: LocalCluster, serve_port: int) -> Iterator[LocalCluster]:
    """The session cluster with its three nodes up (this process its Ray driver); a node
    the test kills is replaced by a new one afterwards."""
    _wait(lambda: len(_alive_nodes()) >= 3, "three live Ray nodes")
    yield ray_cluster
    while len(ray_cluster.workers) < 2:
        ray_cluster.add_worker()
    _wait(lambda: len(_alive_nodes()) >= 3, "the added node to join")


# -- training: first in the module, before the three replicas of the spread app hold
# 1.5 of the CPUs (the restarted workers need 2 of those the survivors have) ------------


def _train_worker_nodes(dashboard_url: str) -> list[str]:
    """Node ids of the live Ray Train workers (one per worker)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [str(a.node_id) for a in actors]


def test_node_killed_during_training_resumes_from_its_last_checkpoint_on_the_others(
    serve_port: int, three_nodes: LocalCluster, tmp_path: Path, figures: Record
) -> None:
    """Two workers spread over the nodes; the node of one dies after epoch 1 was checkpointed
    to the shared storage_path: the run restarts its workers on the live nodes, resumes from
    that checkpoint (not from epoch 0) and finishes every epoch."""
    from jobs.train import CHECKPOINT_PROGRESS, TrainConfig, run_ray_training

    config = TrainConfig(
        model="optimized_cnn",
        dataset="synthetic",
        epochs=3,
        out=str(tmp_path / "artifact"),
        limit=512,
        workers=2,
        cpus_per_worker=1,
        prune="none",
        quantize="none",
        batch_size=32,
        patience=10,
        max_failures=1,
        storage_path=str(tmp_path / "shared-storage"),
        run_name="node-fault",
        augment=False,
    )
    workers = set(_worker_nodes(three_nodes))
    epochs: list[int] = []
    fault: dict[str, Any] = {}
    started = time.monotonic()

    snapshot = Path(config.storage_path or "") / str(config.run_name) / RAY_TRAIN_SNAPSHOT

    def on_epoch(record: dict[str, Any]) -> None:
        epochs.append(int(record["epoch"]))
        print(f"epoch {record['epoch']:.0f} at {time.monotonic() - started:.1f} s: {record}")
        if fault:
            fault.setdefault("next_epoch_at", time.monotonic())
            return
        # Rank 0's report has written the checkpoint; the run resumes from it only once the
        # controller has registered it (its checkpoint manager's snapshot names it).
        _wait(snapshot.is_file, "the checkpoint to be registered", timeout_s=120)
        placed = _train_worker_nodes(three_nodes.head.dashboard_url)
        victims = sorted(set(placed) & workers)
        assert victims, f"no training worker on a worker node: {placed}"
        fault.update(
            after_epoch=int(record["epoch"]),
            worker_nodes=len(set(placed)),
            victim=victims[0],
            at=time.monotonic(),
        )
        _kill_worker_node(three_nodes, victims[0])

    result = run_ray_training(config, on_epoch=on_epoch)
    seconds = time.monotonic() - started
    with result.checkpoint.as_directory() as directory:
        progress = json.loads((Path(directory) / CHECKPOINT_PROGRESS).read_text())
    figures(
        epochs_reported=epochs,
        killed_after_epoch=fault.get("after_epoch"),
        nodes_with_workers_before=fault.get("worker_nodes"),
        resumed_from_epoch=progress.get("resumed_from"),
        final_epoch=progress["epoch"],
        kill_to_next_epoch_s=round(fault["next_epoch_at"] - fault["at"], 1)
        if "next_epoch_at" in fault
        else None,
        kill_to_finish_s=round(time.monotonic() - fault["at"], 1) if fault else None,
        train_seconds=round(seconds, 1),
    )
    assert fault, "training ended before any epoch was reported"
    assert fault["worker_nodes"] == 2, "the two workers were not spread over two nodes"
    assert fault["victim"] not in _alive_nodes()
    # Resumed from the checkpoint of an epoch done before the kill, not restarted at 0 ...
    assert progress["resumed_from"] is not None and progress["resumed_from"] >= 1, progress
    assert progress["resumed_from"] >= fault["after_epoch"], (progress, fault)
    # ... and finished: every epoch trained and reported.
    assert progress["epoch"] == config.epochs
    assert [int(h["epoch"]) for h in progress["history"]] == list(range(1, config.epochs + 1))
    assert sorted(set(epochs)) == list(range(1, config.epochs + 1))


# -- streaming: frames through `stream run` and replicas on every node --------------------


@pytest.fixture
def spread_app(serve_port: int, served_artifact: Path, three_nodes: LocalCluster) -> Iterator[str]:
    """The shipped model with three replicas (0.5 CPU each) over at least two nodes. Per
    test: Serve never moves a replica, so after a node's loss two would share a node."""
    from ray import serve

    from serving.deploy import deploy

    settings = reliability_settings(serve_port, SPREAD_APP).model_copy(
        update={"min_replicas": REPLICAS, "max_replicas": REPLICAS,
                "max_replicas_per_node": PER_NODE}
    )
    deploy(served_artifact, settings, address=None, namespace="framecast-tests", timeout_s=300)
    yield SPREAD_APP
    serve.delete(SPREAD_APP)


def _recovered(replicas: Replicas, app: str, dead: str) -> bool:
    """All the app's replicas alive again, none on the dead node, and the app RUNNING."""
    from ray import serve

    nodes = replicas.nodes(app)
    status = serve.status().applications.get(app)
    return (
        len(nodes) == REPLICAS
        and dead not in nodes.values()
        and status is not None
        and status.status == "RUNNING"
    )


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_worker_node_killed_mid_stream_loses_no_frame(
    kafka_settings: KafkaSettings,
    spread_app: str,
    three_nodes: LocalCluster,
    replicas: Replicas,
    tmp_path: Path,
    figures: Record,
    guarantee: str,
) -> None:
    config = topics(kafka_settings, partitions=2).model_copy(update={"guarantee": guarantee})
    argv = stream_run_argv(
        kafka_settings,
        config,
        spread_app,
        three_nodes.head,
        tmp_path,
        "--consumer-id",
        f"node-fault-{guarantee}",
        "--max-batch",
        "16",
        idle_exit_s=600,  # stopped by SIGTERM once every frame is labelled
    )
    before = replicas.nodes(spread_app)
    assert len(set(before.values())) >= 2, f"replicas not spread over the nodes: {before}"
    workers = set(_worker_nodes(three_nodes))
    on_workers = sorted(set(before.values()) & workers)
    assert on_workers, f"no replica on a worker node: {before}, workers {workers}"
    victim = on_workers[0]
    probe = LabelProbe(kafka_settings, config.labels_topic)
    # Frames flow until well after the recovery: the feeder is stopped by the test.
    feeder = Feeder(kafka_settings, config.frames_topic, streams=2, per_stream=5000, fps=20.0)
    log, out = tmp_path / "stream-run.log", tmp_path / "stream-run.out"
    figures_now: dict[str, Any] = {"guarantee": guarantee}
    killed = False
    try:
        with log.open("wb") as err, out.open("wb") as stdout:
            process = subprocess.Popen(argv, env=stream_run_env(), stdout=stdout, stderr=err)
            try:
                wait_for_start(process, log)
                feeder.start()
                assert probe.wait_for(80) >= 80, log.read_text()[-3000:]
                kill_ns = time.time_ns()
                started = time.monotonic()
                _kill_worker_node(three_nodes, victim)
                killed = True
                labelled_at_kill = probe.seen
                node_dead_s = _wait(lambda: victim not in _alive_nodes(), "the node marked dead")
                recovered_s = node_dead_s + _wait(
                    lambda: _recovered(replicas, spread_app, victim), "replicas back on survivors"
                )
                after = replicas.nodes(spread_app)
                # Labels flow on the survivors, then the feed ends.
                assert probe.wait_for(probe.seen + 100) >= labelled_at_kill + 100
                recovery_s = time.monotonic() - started
                feeder.stop_event.set()
                expected = feeder.finish()
                assert probe.wait_for_frames(expected), "not every frame was labelled"
            finally:
                feeder.stop_event.set()
                process.send_signal(signal.SIGTERM)  # drain, commit, close
                try:
                    process.wait(120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(30)
        assert process.returncode == 0, log.read_text()[-3000:]
    finally:
        probe.close()
    totals = json.loads(out.read_text().strip().splitlines()[-1])
    exactly_once = guarantee == "exactly-once"
    labels = labels_of(
        read_topic(kafka_settings, config.labels_topic, len(expected), committed_only=exactly_once)
    )
    counts = tally(expected, labels)
    stamps = sorted(lab.labeled_at_ns for lab in labels)
    after_kill = [s for s in stamps if s > kill_ns]
    gaps = [b - a for a, b in zip([kill_ns, *after_kill], after_kill, strict=False)]
    # The classifier's retried Serve calls (its warnings), by error: calls that died with
    # the node's replica, or none when no call was in flight on it.
    retried = collections.Counter(re.findall(r"Serve call .*?\((\w+): ", log.read_text()))
    figures_now.update(
        **counts,
        serve_calls_retried=dict(retried),
        labelled_by_stream_run=totals["labelled"],
        labelled_before_kill=labelled_at_kill,
        nodes_with_replicas_before=len(set(before.values())),
        replicas_on_killed_node=list(before.values()).count(victim),
        replicas_after=len(after),
        node_marked_dead_s=round(node_dead_s, 1),
        replicas_back_s=round(recovered_s, 1),
        kill_to_first_label_s=round((after_kill[0] - kill_ns) / 1e9, 2),
        longest_label_gap_after_kill_s=round(max(gaps) / 1e9, 2),
        kill_to_full_recovery_s=round(recovery_s, 1),
    )
    figures(**figures_now)
    print(f"node fault ({guarantee}): {json.dumps(figures_now, sort_keys=True)}")
    assert killed and victim not in after.values()
    assert counts["losses"] == 0 and counts["unexpected"] == 0, counts
    # At-least-once: every frame has at least one label; its repeats share its source.
    assert counts["distinct_sources"] == len(expected), counts
    if exactly_once:
        assert counts["duplicates"] == 0, counts
