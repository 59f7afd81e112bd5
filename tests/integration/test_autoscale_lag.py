"""Serve replicas scaled on Kafka lag (serving.autoscale) against the real broker and Serve.

A burst of frames waits in the frames topic: the lag policy, running in the real Serve
controller and reading the classifiers' group lag from the real broker, takes the app from 1
to 3 replicas; the stream classifier then labels every frame, the lag drains, and the app goes
back to 1 replica. Delays are short here (1 s up, 3 s down) so the test is short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.processes import wait_until
from cluster.ray_head import RayHeadInfo
from serving.config import ServeSettings
from serving.deploy import deploy
from streams.config import KafkaSettings
from tests.streaming import (
    BackgroundClassifier,
    classifier,
    labels_of,
    read_topic,
    send_arrow_frames,
    topics,
)

APP = "lagscale"


def _replicas() -> dict[str, Any]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {"running": 0, "total": 0}
    states = app.deployments["Classifier"].replica_states
    running = sum(
        n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING"
    )
    return {"running": running, "total": sum(states.values())}


def _replica_nodes(ray_head: RayHeadInfo) -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray_head.dashboard_url,
        filters=[("class_name", "=", f"ServeReplica:{APP}:Classifier"), ("state", "=", "ALIVE")],
    )
    return [str(actor.node_id) for actor in actors]


def test_a_burst_scales_serve_up_on_lag_and_back_down_once_drained(
    kafka_settings: KafkaSettings, serve_port: int, served_artifact: Path, ray_head: RayHeadInfo
) -> None:
    import ray
    from ray import serve

    config = topics(kafka_settings, partitions=3)
    settings = ServeSettings(
        app_name=APP, route_prefix=f"/{APP}", http_port=serve_port, num_cpus=0.25,
        min_replicas=1, max_replicas=3, autoscale_on="lag",
        lag_bootstrap_servers=kafka_settings.bootstrap_servers, lag_group=config.group,
        lag_topic=config.frames_topic, lag_target_per_replica=100, lag_target_age_s=600,
        lag_poll_interval_s=0.5, upscale_delay_s=1.0, downscale_delay_s=3.0,
    )
    deploy(served_artifact, settings, address=None, namespace="framecast-tests", timeout_s=300)
    member = None
    try:
        assert _replicas()["running"] == 1
        sent = send_arrow_frames(kafka_settings, config.frames_topic, streams=3, per_stream=200)
        # 600 frames behind, 100 a replica: the policy wants 6, Serve's bounds give 3.
        assert wait_until(lambda: _replicas()["running"] >= 3, timeout=180, interval=0.5), (
            _replicas()
        )
        peak = _replicas()["running"]
        nodes = _replica_nodes(ray_head)
        member = BackgroundClassifier(classifier(kafka_settings, config, APP))
        member.start()
        totals = member.finish(timeout=300)  # idle_exit_s: stops once the burst is labelled
        assert totals["labelled"] == len(sent) == 600
        labels = labels_of(read_topic(kafka_settings, config.labels_topic, 600))
        assert len({(lab.source.partition, lab.source.offset) for lab in labels}) == 600
        assert {(lab.stream_id, lab.frame_index) for lab in labels} == {
            (s, i) for s, i, _ in sent
        }
        # Drained (lag 0): back to min_replicas after the downscale delay.
        assert wait_until(lambda: _replicas()["total"] == 1, timeout=180, interval=0.5), (
            _replicas()
        )
        assert peak == 3
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) >= 3:  # the multi-node session cluster: one replica per node
            assert len(set(nodes)) == 3, nodes
    finally:
        if member is not None:
            member.abandon()
        serve.delete(APP)
