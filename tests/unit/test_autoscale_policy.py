"""The lag autoscaling policy's arithmetic, its Serve wiring, and what it does without Kafka.

The decisions are pure functions of (lag, oldest frame's age, lag a while ago); the policy
object is run through Serve's own wrapper (bounds, factors, delays) with a real
AutoscalingContext, against a Kafka address nothing listens on. The policy reading a real
broker in a real Serve controller is tests/integration/test_autoscale_lag.py.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pytest
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.processes import free_port
from serving import kafka_lag
from serving.app import deployment_options
from serving.autoscale import POLICY_PATH, KafkaLagPolicy, desired_replicas, policy_config
from serving.config import ServeSettings
from serving.exceptions import DeployError


def _want(current: int, lag: int, age_s: float = 0.0, lag_before: int | None = None) -> float:
    return desired_replicas(current=current, lag=lag, age_s=age_s, lag_before=lag_before,
                            target_lag=100, target_age_s=5.0)


def test_replicas_follow_the_lag_over_its_target_per_replica() -> None:
    assert _want(1, 0) == 0
    assert _want(1, 250) == 2.5
    assert _want(4, 100) == 1.0  # drained to one replica's worth: fewer


def test_one_more_replica_while_the_oldest_frame_is_too_old() -> None:
    assert _want(2, 50, age_s=6.0) == 3
    assert _want(2, 50, age_s=4.0) == 0.5
    assert _want(2, 0, age_s=60.0) == 0  # no lag, no age: nothing waits


def test_never_fewer_replicas_while_the_backlog_grows() -> None:
    assert _want(3, 120, lag_before=100) == 3
    assert _want(3, 120, lag_before=200) == 1.2  # shrinking: may scale down


def test_oldest_frame_age_from_the_end_offset_history() -> None:
    moves = deque([(10.0, 100), (11.0, 150), (12.0, 300)])
    # frame 120 arrived after t=10 (end 100) and by t=11 (end 150)
    assert kafka_lag.oldest_age(moves, committed=120, now=20.0, since=0.0) == 9.0
    assert list(moves) == [(10.0, 100), (11.0, 150), (12.0, 300)]
    assert kafka_lag.oldest_age(moves, committed=160, now=20.0, since=0.0) == 8.0
    assert moves[0] == (11.0, 150)  # history before the committed offset is dropped
    # a backlog from before the history began counts from the reader's start
    assert kafka_lag.oldest_age(deque([(10.0, 100)]), committed=50, now=20.0, since=10.0) == 10


def _ctx(policy_state: dict[str, Any], current: int, target: int) -> AutoscalingContext:
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0,
                               downscale_delay_s=0)
    return AutoscalingContext(
        deployment_id=None, deployment_name="Classifier", app_name="t",  # type: ignore[arg-type]
        current_num_replicas=current, target_num_replicas=target, running_replicas=[],
        total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=None,
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
        policy_state=policy_state, last_scale_up_time=None, last_scale_down_time=None,
        current_time=time.time(), config=config,
    )


def test_without_kafka_the_policy_holds_the_replica_count_and_never_raises() -> None:
    policy = KafkaLagPolicy(bootstrap=f"127.0.0.1:{free_port()}", group="g", topic="t",
                            poll_interval_s=0.2, stale_s=1.0)
    try:
        wrapped = _apply_autoscaling_config(policy)
        for _ in range(3):
            replicas, state = wrapped(_ctx({}, current=3, target=3))
            assert replicas == 3
            assert state["framecast_lag"] is None
            time.sleep(0.3)
    finally:
        kafka_lag.release(policy.target, policy.poll_interval_s)


def test_a_stale_reading_holds_too() -> None:
    policy = KafkaLagPolicy(bootstrap=f"127.0.0.1:{free_port()}", group="g2", topic="t",
                            poll_interval_s=5.0, stale_s=1.0)
    try:
        old = kafka_lag.LagReading(lag=10_000, age_s=60.0, at=time.time() - 2.0,
                                   partitions=1)
        policy.reader._latest = old  # the last reading before Kafka went away, 2 s ago
        assert policy(_ctx({}, current=2, target=2))[0] == 2
        policy.reader._latest = kafka_lag.LagReading(
            lag=10_000, age_s=60.0, at=time.time(), partitions=1)
        assert policy(_ctx({}, current=2, target=2))[0] == 5.0  # fresh: 10000 / 2000
    finally:
        kafka_lag.release(policy.target, policy.poll_interval_s)


def test_policies_of_one_target_share_one_reader_thread() -> None:
    target = kafka_lag.LagTarget(f"127.0.0.1:{free_port()}", "g3", "t")
    first = kafka_lag.acquire(target, 1.0)
    second = kafka_lag.acquire(target, 1.0)
    assert first is second
    assert isinstance(first, kafka_lag.LagReader)  # no Ray here: a thread of this process
    kafka_lag.release(target, 1.0)
    assert not first._stop.is_set()
    kafka_lag.release(target, 1.0)
    assert first._stop.is_set()


def test_deploy_options_attach_the_policy_and_serve_accepts_them() -> None:
    settings = ServeSettings(
        min_replicas=1, max_replicas=3, autoscale_on="lag", lag_bootstrap_servers="k:9092",
        lag_group="g", lag_topic="frames", upscale_delay_s=1, downscale_delay_s=3,
    )
    scaling = deployment_options(settings)["autoscaling_config"]
    assert scaling["policy"]["policy_function"] == POLICY_PATH
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (1, 3)
    config = AutoscalingConfig(**scaling)
    assert config.policy.get_policy().__name__ == "KafkaLagPolicy"
    assert "policy" not in deployment_options(
        settings.model_copy(update={"autoscale_on": "requests"}))["autoscaling_config"]
    assert "num_replicas" in deployment_options(settings.model_copy(update={"max_replicas": 1}))


def test_lag_scaling_without_its_inputs_is_refused_naming_them() -> None:
    with pytest.raises(DeployError, match=r"serve\.lag_group, serve\.lag_topic"):
        policy_config(ServeSettings(autoscale_on="lag", lag_bootstrap_servers="k:9092"))
    with pytest.raises(ValueError, match="autoscale_on"):
        ServeSettings(autoscale_on="cpu")


def test_serve_deploy_fills_the_lag_inputs_from_the_rest_of_the_settings() -> None:
    from cluster.lag_autoscale import with_lag_inputs
    from cluster.settings import load_settings

    settings = load_settings(kafka={"bootstrap_servers": "k:9092"}, serve={"autoscale_on": "lag"},
                             stream={"group": "cams", "frames_topic": "frames.hd"})
    serve = with_lag_inputs(settings)
    assert (serve.lag_bootstrap_servers, serve.lag_group, serve.lag_topic) == (
        "k:9092", "cams", "frames.hd")
    given = load_settings(kafka={"bootstrap_servers": "k:9092"},
                          serve={"autoscale_on": "lag", "lag_group": "other"})
    assert with_lag_inputs(given).lag_group == "other"
    plain = load_settings(kafka={"bootstrap_servers": "k:9092"})
    assert with_lag_inputs(plain).lag_bootstrap_servers is None  # requests: left alone


def test_bench_autoscale_summary_counts_back_to_min_only_after_the_peak() -> None:
    from cluster.bench.autoscale import summarize

    def row(t: float, lag: int, replicas: int, labelled: int) -> dict[str, object]:
        return {"t": t, "lag": lag, "age_s": 0.0, "replicas": replicas, "labelled": labelled,
                "labelled_fps": 0.0}

    # Replicas Serve asked for during the burst start only after it drained (seen on 2 cores).
    late = [row(0, 0, 1, 0), row(3, 500, 1, 100), row(6, 0, 1, 1000), row(8, 0, 3, 1000),
            row(20, 0, 3, 1000), row(22, 0, 1, 1000)]
    s = summarize(late, burst_at=1.0, min_replicas=1, total=1000)
    assert (s["peak_lag"], s["peak_replicas"], s["time_to_drain_s"]) == (500, 3, 5.0)
    assert s["time_to_first_scale_up_s"] == 7.0
    assert s["time_back_to_min_s"] == 21.0  # not 5.0: the replica count at the drain
    never = [row(0, 0, 1, 0), row(3, 500, 1, 100), row(6, 0, 1, 1000)]
    assert summarize(never, burst_at=1.0, min_replicas=1, total=1000)["time_back_to_min_s"] is None
