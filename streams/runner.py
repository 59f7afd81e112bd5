"""One way to start a stream classifier: its topics, its Serve client and the classifier.

``framecast stream run``, the demo and the benchmarks all go through :class:`StreamRun`
(Ray must be connected: ``cluster.stack.ray_connection``; or, with ``classify`` given - e.g.
``serving.inference.LocalClassify``, the model in this process - no Ray at all)::

    with StreamRun(kafka, bootstrap, topics, config, serve) as run:
        totals = run.run()              # in the foreground, until stop() or a limit
    # or
    with StreamRun(...) as run:
        run.start()                     # in a thread of this process
        run.wait_assigned(timeout_s=120)
        ...
        totals = run.finish()
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from serving.config import ServeSettings
from serving.frames import FrameRecord
from streams.classifier import StreamClassifier
from streams.client import admin_client
from streams.config import ClassifierConfig, KafkaSettings, TopicSettings
from streams.exceptions import StreamsError
from streams.serve_client import serve_classify_fn
from streams.topics import default_topic_specs, ensure_topics


def check_serve_app(app_name: str) -> None:
    """Raise StreamsError unless a Serve application of that name is running."""
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception as error:
        raise StreamsError(
            f"Ray Serve does not answer on this Ray cluster ({type(error).__name__}: "
            f"{str(error)[:200]}); deploy a model with `framecast serve deploy DIR`"
        ) from None
    status = applications.get(app_name)
    if status is None:
        known = ", ".join(sorted(applications)) or "none"
        raise StreamsError(
            f"no Serve application named {app_name!r} is deployed (deployed: {known}); "
            "deploy one with `framecast serve deploy DIR`"
        )
    if str(status.status) not in ("RUNNING", "ApplicationStatus.RUNNING"):
        raise StreamsError(f"Serve application {app_name!r} is {status.status}, not RUNNING")


class Classify(Protocol):
    """What the classifier calls per batch: ``classify(frames)`` gives a response whose
    ``result(timeout_s=...)`` is one answer per frame; ``close()`` when done."""

    def __call__(self, frames: list[FrameRecord]) -> Any: ...

    def close(self) -> None: ...


class StreamRun:
    """A stream classifier wired to its topics and its Serve application (or to the
    ``classify`` it is given)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        bootstrap: str,
        topics: TopicSettings,
        config: ClassifierConfig,
        serve: ServeSettings,
        *,
        create_topics: bool = True,
        classify: Classify | None = None,
    ) -> None:
        self.kafka, self.bootstrap = kafka, bootstrap
        self.topics = topics
        self.config = config.follow_topics(topics)
        self.serve = serve
        self.create_topics = create_topics
        self.given = classify  # closed here too: the run owns it
        self.classify: Classify | None = None
        self.classifier: StreamClassifier | None = None
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}
        self._error: BaseException | None = None

    def __enter__(self) -> StreamRun:
        if self.create_topics:
            # The classifier's topics as the topics section specifies them (the frames and
            # DLQ topics take large messages; the latency topic has one partition).
            names = self.topics.model_copy(
                update={
                    "frames": self.config.frames_topic,
                    "labels": self.config.labels_topic,
                    "latency": self.config.latency_topic,
                    "dlq": self.config.dlq_topic,
                }
            )
            with admin_client(self.kafka, self.bootstrap) as admin:
                ensure_topics(admin, default_topic_specs(names))
        classify: Classify
        retriable: tuple[type[BaseException], ...]
        if self.given is not None:
            classify, retriable = self.given, ()  # no Serve: every failure is the frames'
        else:
            check_serve_app(self.serve.app_name)
            classify, retriable = serve_classify_fn(
                self.serve.app_name, self.serve.handle_transport
            )
        self.classify = classify
        try:
            classify([]).result(timeout_s=60)  # the handle's first call, before any clock
            self.classifier = StreamClassifier(
                self.kafka, self.bootstrap, self.config, classify, retriable
            )
        except BaseException:
            classify.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop()
            self._thread.join(timeout=120)
        if self.classify is not None:
            self.classify.close()

    @property
    def member(self) -> StreamClassifier:
        """The classifier (after ``__enter__``)."""
        if self.classifier is None:
            raise RuntimeError("StreamRun is used outside its `with` block")
        return self.classifier

    def run(self) -> dict[str, Any]:
        """Run in the foreground; returns the classifier's totals."""
        return self.member.run()

    def start(self) -> None:
        """Run in a thread of this process (``finish`` returns the totals)."""
        member = self.member

        def target() -> None:
            try:
                self._outcome.update(member.run())
            except BaseException as error:  # re-raised by finish()
                self._error = error

        self._thread = threading.Thread(target=target, name="stream-classifier", daemon=True)
        self._thread.start()

    def wait_assigned(self, timeout_s: float = 120.0) -> bool:
        """Wait until the classifier owns partitions (False if it did not, or stopped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.member.assignment():
                return True
            if self._thread is not None and not self._thread.is_alive():
                break
            time.sleep(0.05)
        if self._error is not None:
            raise StreamsError(f"the classifier stopped: {self._error}") from self._error
        return False

    def stop(self) -> None:
        """Ask the classifier to drain, commit and stop."""
        self.member.stop()

    def finish(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Wait for the thread started by ``start`` to end; its totals."""
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                raise StreamsError(f"the classifier did not stop within {timeout_s:g}s")
        if self._error is not None:
            raise self._error
        return dict(self._outcome)
