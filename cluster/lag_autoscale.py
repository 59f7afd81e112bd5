"""`--autoscale-on lag`: the policy's inputs the Serve settings leave unset, from the rest of
the settings (the stack's Kafka, the stream section's group and frames topic)."""

from __future__ import annotations

from cluster import stack
from cluster.settings import FramecastSettings
from serving.config import ServeSettings


def with_lag_inputs(settings: FramecastSettings) -> ServeSettings:
    """settings.serve with lag_bootstrap_servers, lag_group and lag_topic filled where unset
    (autoscale_on=lag only); the Kafka's security settings go along, never its secrets."""
    serve = settings.serve
    if serve.autoscale_on != "lag":
        return serve
    return serve.model_copy(update={
        "lag_bootstrap_servers": serve.lag_bootstrap_servers or stack.kafka_bootstrap(settings),
        "lag_group": serve.lag_group or settings.stream.group,
        "lag_topic": serve.lag_topic or settings.stream.frames_topic,
    })
