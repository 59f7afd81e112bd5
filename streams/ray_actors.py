"""Stream classifiers as Ray actors: ``framecast stream run --on-ray N``.

Each actor runs the very :class:`streams.runner.StreamRun` (and so
:class:`streams.classifier.StreamClassifier`) that ``stream run`` runs as a plain process, in
a thread of the actor, in the same consumer group: the N actors share the frames topic's
partitions as N processes would. The actors are spread over the cluster's nodes (Ray's
``SPREAD`` scheduling strategy) and owned by the driver that starts them (not detached): if
that driver dies, Ray ends them too, and the group gives their partitions to the others.

Ray must be connected (``cluster.stack.ray_connection``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from serving.config import ServeSettings
from streams.config import ClassifierConfig, KafkaSettings, TopicSettings
from streams.exceptions import StreamsError
from streams.runner import StreamRun


class ClassifierActor:
    """One stream classifier inside a Ray actor (a threaded actor: ``stop`` and ``progress``
    are answered while the classifier runs)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        bootstrap: str,
        topics: TopicSettings,
        config: ClassifierConfig,
        serve: ServeSettings,
    ) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.run = StreamRun(kafka, bootstrap, topics, config, serve, create_topics=False)
        self.run.__enter__()
        self.run.start()

    def where(self) -> str:
        """The Ray node id this actor runs on."""
        return str(self.node_id)

    def wait_assigned(self, timeout_s: float) -> bool:
        """True once its classifier owns partitions."""
        return self.run.wait_assigned(timeout_s)

    def progress(self) -> dict[str, Any]:
        """Frames handled so far (labelled + dropped + dead-lettered) and whether it runs."""
        thread = self.run._thread  # StreamRun's own worker thread
        totals = self.run.member.totals
        handled = int(totals["labelled"] + totals["dropped_deadline"] + totals["dlq"])
        return {"handled": handled, "running": bool(thread is not None and thread.is_alive())}

    def stop(self) -> None:
        """Ask the classifier to drain, commit and stop."""
        self.run.stop()

    def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the classifier to stop; its totals and this actor's node id."""
        try:
            totals = self.run.finish(timeout_s)
        finally:
            self.run.__exit__(None, None, None)
        return {**totals, "node_id": self.node_id}


@dataclass
class RayClassifiers:
    """N classifier actors started by :func:`start_on_ray` (this process owns them)."""

    actors: list[Any]
    consumer_ids: list[str]
    stopping: bool = field(default=False)

    def nodes(self, timeout_s: float = 120.0) -> list[str]:
        """Each actor's Ray node id, in actor order."""
        import ray

        return [str(n) for n in ray.get([a.where.remote() for a in self.actors], timeout=timeout_s)]

    def wait_assigned(self, timeout_s: float = 120.0) -> bool:
        """True once every actor owns partitions (fewer partitions than actors: never)."""
        import ray

        calls = [a.wait_assigned.remote(timeout_s) for a in self.actors]
        return all(ray.get(calls, timeout=timeout_s + 30))

    def progress(self) -> list[dict[str, Any]]:
        import ray

        return list(ray.get([a.progress.remote() for a in self.actors], timeout=60))

    def stop(self) -> None:
        """Ask every actor to drain, commit and stop (safe to call from a signal handler)."""
        self.stopping = True

    def wait(self, max_frames: int | None, poll_s: float = 0.5) -> None:
        """Until stop(), every actor has stopped by itself (idle_exit_s), or the actors together
        handled max_frames; then every actor is asked to stop."""
        while not self.stopping:
            progress = self.progress()
            if not any(p["running"] for p in progress):
                break
            if max_frames and sum(p["handled"] for p in progress) >= max_frames:
                break
            time.sleep(poll_s)
        self._stop_all()

    def _stop_all(self) -> None:
        import ray

        ray.get([a.stop.remote() for a in self.actors], timeout=60)

    def finish(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Every actor's totals (by consumer id), their sum, and the nodes they ran on; the
        actors are ended afterwards."""
        import ray

        try:
            calls = [a.finish.remote(timeout_s) for a in self.actors]
            results = ray.get(calls, timeout=timeout_s + 60)
        finally:
            for actor in self.actors:
                ray.kill(actor)
        total: dict[str, Any] = {}
        for result in results:
            for key, value in result.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        if "seconds" in total:
            total["seconds"] = max(r.get("seconds", 0.0) for r in results)
        return {
            **total,
            "actors": len(results),
            "nodes": sorted({r["node_id"] for r in results}),
            "per_actor": dict(zip(self.consumer_ids, results, strict=True)),
        }


def start_on_ray(
    count: int,
    kafka: KafkaSettings,
    bootstrap: str,
    topics: TopicSettings,
    config: ClassifierConfig,
    serve: ServeSettings,
    *,
    num_cpus: float = 0.25,
    timeout_s: float = 180.0,
) -> RayClassifiers:
    """Start ``count`` classifier actors spread over the nodes; returns once each is built
    (its Serve handle's first call done) or raises StreamsError naming the one that failed.

    Each gets the consumer id ``<consumer_id>-ray<i>`` (its transactional id under
    exactly-once) and no ``max_frames`` of its own: the caller's limit is on their sum.
    """
    import ray

    if count < 1:
        raise StreamsError("--on-ray needs at least one actor")
    remote: Any = ray.remote(ClassifierActor).options(
        num_cpus=num_cpus, max_concurrency=4, scheduling_strategy="SPREAD", max_restarts=0
    )
    consumer_ids = [f"{config.consumer_id}-ray{i}" for i in range(count)]
    actors: list[Any] = [
        remote.remote(
            kafka, bootstrap, topics,
            config.model_copy(update={"consumer_id": cid, "max_frames": None}), serve,
        )
        for cid in consumer_ids
    ]
    classifiers = RayClassifiers(actors, consumer_ids)
    try:
        classifiers.nodes(timeout_s)
    except Exception as error:
        for actor in actors:
            ray.kill(actor)
        raise StreamsError(
            f"the classifier actors did not start: {type(error).__name__}: {str(error)[:500]}"
        ) from None
    return classifiers
