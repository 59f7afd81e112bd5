"""Ray Serve replicas autoscaled on Kafka lag: the policy the Serve controller runs each tick.

Serve's own policy (ray.serve.autoscaling_policy.replica_queue_length_autoscaling_policy)
wants ``ongoing requests / target_ongoing_requests`` replicas; this one wants
``lag / lag_target_per_replica``, where the lag is the classifiers' consumer-group lag on the
frames topic, and one replica more than today while the oldest unlabelled frame is older
than ``lag_target_age_s``. While the backlog grows it never asks for fewer replicas than it
has. Serve wraps the returned number as it wraps its own policy's: min_replicas..max_replicas,
upscale_delay_s / downscale_delay_s (a decision must hold that long before it is made, so
the count does not flap), upscaling/downscaling factors.

The lag comes from a background reader (serving.kafka_lag) so a tick never waits on Kafka.
Before the first reading, or when the last one is older than ``stale_s`` (Kafka down), the
policy holds the current target: it never scales on no information, and it never raises into
the controller.

Deployed by ``serve deploy --autoscale-on lag`` (serving.app.deployment_options) or, in a
RayService, by ``autoscaling_config.policy`` naming ``serving.autoscale:KafkaLagPolicy`` with
the same keyword arguments (helm/framecast values ``serve.autoscaling``).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from serving import kafka_lag
from serving.config import ServeSettings
from serving.exceptions import DeployError

POLICY_PATH = "serving.autoscale:KafkaLagPolicy"
GROWTH_WINDOW_S = 5.0  # the backlog "grows" when the lag is above its value this long ago

logger = logging.getLogger("ray.serve")


def desired_replicas(
    *,
    current: int,
    lag: int,
    age_s: float,
    lag_before: int | None,
    target_lag: int,
    target_age_s: float,
) -> float:
    """The replica count the lag asks for (before Serve's bounds, factors and delays)."""
    desired: float = lag / target_lag
    if current > 0 and lag > 0 and age_s > target_age_s:
        desired = max(desired, current + 1)  # frames wait too long: one more
    if current > 0 and lag > 0 and lag_before is not None and lag > lag_before:
        desired = max(desired, current)  # still growing: never fewer
    return desired


class KafkaLagPolicy:
    """A class-callable Serve autoscaling policy (``AutoscalingPolicy(policy_function=...,
    policy_kwargs=...)``): Serve makes one per deployment version and calls it each tick."""

    def __init__(
        self,
        *,
        group: str,
        bootstrap: str = "",
        topic: str,
        target_lag_per_replica: int = 2000,
        target_age_s: float = 5.0,
        poll_interval_s: float = 1.0,
        stale_s: float = 15.0,
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        ssl_cafile: str | None = None,
    ) -> None:
        self.target = kafka_lag.LagTarget(
            bootstrap=bootstrap, group=group, topic=topic,
            security_protocol=security_protocol, sasl_mechanism=sasl_mechanism,
            sasl_username=sasl_username, ssl_cafile=ssl_cafile,
        )
        self.target_lag = max(1, int(target_lag_per_replica))
        self.target_age_s = float(target_age_s)
        self.poll_interval_s = float(poll_interval_s)
        self.stale_s = float(stale_s)
        self.reader = kafka_lag.acquire(self.target, self.poll_interval_s)
        self.history: list[tuple[float, int]] = []  # (time.time(), lag), GROWTH_WINDOW_S of it
        weakref.finalize(self, kafka_lag.release, self.target, self.poll_interval_s)

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        state: dict[str, Any] = dict(ctx.policy_state or {})
        try:
            return self._decide(ctx, state)
        except Exception:  # a policy error must not take the controller down: hold
            logger.exception("framecast lag autoscaler: holding %s", ctx.target_num_replicas)
            return ctx.target_num_replicas, state

    def _decide(self, ctx: Any, state: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        reading = self.reader.latest()
        now = time.time()
        if reading is None or now - reading.at > self.stale_s:
            state["framecast_lag"] = None  # no information: hold
            return ctx.target_num_replicas, state
        self.history = [(t, v) for t, v in self.history if now - t <= GROWTH_WINDOW_S * 2]
        before = [v for t, v in self.history if now - t >= GROWTH_WINDOW_S]
        lag_before = before[-1] if before else None
        if not self.history or self.history[-1][0] != reading.at:
            self.history.append((reading.at, reading.lag))
        desired = desired_replicas(
            current=ctx.current_num_replicas, lag=reading.lag, age_s=reading.age_s,
            lag_before=lag_before, target_lag=self.target_lag, target_age_s=self.target_age_s,
        )
        state["framecast_lag"] = reading.lag
        state["framecast_age_s"] = reading.age_s
        return desired, state


def policy_config(settings: ServeSettings) -> dict[str, Any]:
    """The ``autoscaling_config.policy`` of a lag-scaled deployment, from the settings; a
    missing input is refused here (at deploy), naming its field."""
    missing = [
        name for name in ("lag_bootstrap_servers", "lag_group", "lag_topic")
        if not getattr(settings, name)
    ]
    if missing:
        raise DeployError(
            f"serve.autoscale_on=lag needs serve.{', serve.'.join(missing)} "
            "(FRAMECAST_SERVE_" + ", FRAMECAST_SERVE_".join(m.upper() for m in missing) + ")"
        )
    kwargs: dict[str, Any] = {
        "bootstrap": settings.lag_bootstrap_servers,
        "group": settings.lag_group,
        "topic": settings.lag_topic,
        "target_lag_per_replica": settings.lag_target_per_replica,
        "target_age_s": settings.lag_target_age_s,
        "poll_interval_s": settings.lag_poll_interval_s,
        "stale_s": settings.lag_stale_s,
    }
    return {"policy_function": POLICY_PATH, "policy_kwargs": kwargs}
