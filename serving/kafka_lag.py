"""A consumer group's lag on a topic, read in the background for the lag autoscaling policy.

The policy (serving.autoscale) runs inside the Serve controller once per control-loop tick, so
it must never wait on Kafka: a daemon thread (LagReader) reads the group's committed offsets and
the topic's end offsets with the Kafka admin API every ``interval_s`` and keeps the latest
reading; the policy only reads that. In the controller that thread runs in a small Ray actor
of its own (RemoteLagReader, asked without waiting), never in the controller's process. A
Kafka that is down leaves the last good reading in place (its ``at`` ages, and the policy
holds the replica count once it is stale).

The age of the oldest unlabelled frame is worked out without reading any frame: the thread
keeps, per partition, the times at which the end offset moved; the oldest unlabelled frame
of a partition (at its committed offset c) arrived no later than the first reading whose end
offset was past c. Frames older than the thread are counted from the thread's start (a
lower bound). Resolution: one ``interval_s``.

This module is imported by reference from the controller (Serve pickles the policy's own
module by value), so its registry is one per process: policies re-made on every deployment
update share one reader per (bootstrap, group, topic) instead of starting one each.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("ray.serve")

PASSWORD_ENV = "FRAMECAST_KAFKA_SASL_PASSWORD"  # noqa: S105 - a variable's name
# Where an empty bootstrap / SASL user name is taken from in the controller (a RayService's
# head pod gets them from the Kafka Secret, as the classifier pods do).
BOOTSTRAP_ENV = "FRAMECAST_KAFKA_BOOTSTRAP_SERVERS"
USERNAME_ENV = "FRAMECAST_KAFKA_SASL_USERNAME"
_NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: the group has committed nothing there


@dataclass(frozen=True)
class LagTarget:
    """Where the lag is read: Kafka connection (no secrets), group and topic. An empty
    bootstrap (or SASL user name) is read from the environment (BOOTSTRAP_ENV, USERNAME_ENV)."""

    bootstrap: str
    group: str
    topic: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    ssl_cafile: str | None = None

    def client_config(self) -> dict[str, Any]:
        """confluent-kafka admin config; the SASL password only from the environment."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap or os.environ.get(BOOTSTRAP_ENV, ""),
            "client.id": "framecast-autoscaler",
            "security.protocol": self.security_protocol,
            "socket.timeout.ms": 3000,
            "socket.connection.setup.timeout.ms": 3000,
            "reconnect.backoff.max.ms": 2000,
            "reconnect.backoff.ms": 500,
            "log.connection.close": False,
            # librdkafka's own lines off (a Kafka that is down would log every reconnect):
            # the reader logs its failures itself, throttled.
            "log_level": 0,
        }
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username or os.environ.get(USERNAME_ENV, "")
            config["sasl.password"] = os.environ.get(PASSWORD_ENV, "")
        if self.ssl_cafile:
            config["ssl.ca.location"] = self.ssl_cafile
        return config


@dataclass(frozen=True)
class LagReading:
    """One reading: total lag (frames), oldest unlabelled frame's age (s), when (time.time():
    the reader may run in another process, on another node)."""

    lag: int
    age_s: float
    at: float
    partitions: int


@dataclass
class _Partition:
    # (monotonic time, end offset) each time the end offset moved, oldest first.
    moves: deque[tuple[float, int]] = field(default_factory=deque)


def oldest_age(moves: deque[tuple[float, int]], committed: int, now: float, since: float) -> float:
    """Age of the frame at offset `committed` from the end-offset history (pruned in place):
    the first time the end offset was seen past it, or `since` if it was before the history."""
    while len(moves) > 1 and moves[1][1] <= committed:
        moves.popleft()
    for seen_at, end in moves:
        if end > committed:
            return max(0.0, now - seen_at)
    return max(0.0, now - since)


class LagReader:
    """The daemon thread that reads one group's lag on one topic."""

    def __init__(self, target: LagTarget, interval_s: float) -> None:
        self.target = target
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.errors = 0
        self._latest: LagReading | None = None
        self._partitions: dict[int, _Partition] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"framecast-lag-{target.group}", daemon=True
        )
        self._thread.start()

    def latest(self) -> LagReading | None:
        """The last good reading (None before the first)."""
        return self._latest

    def stop(self) -> None:
        """Stop the thread (it exits within one interval)."""
        self._stop.set()

    def _loop(self) -> None:
        admin: Any = None
        while not self._stop.is_set():
            try:
                if admin is None:
                    from confluent_kafka.admin import AdminClient

                    admin = AdminClient(self.target.client_config())
                self._latest = self._read(admin)
            except Exception as error:  # never let Kafka kill the controller
                self.errors += 1
                if self.errors in (1, 10) or self.errors % 100 == 0:
                    logger.warning(
                        "framecast lag autoscaler: no lag reading from %s (%s errors): %s",
                        self.target.bootstrap, self.errors, type(error).__name__,
                    )
            self._stop.wait(self.interval_s)

    def _read(self, admin: Any) -> LagReading:
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        timeout = max(1.0, min(5.0, self.interval_s * 3))
        metadata = admin.list_topics(self.target.topic, timeout=timeout)
        topic = metadata.topics.get(self.target.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise LookupError(f"topic {self.target.topic} is not known to the brokers")
        parts = [TopicPartition(self.target.topic, p) for p in sorted(topic.partitions)]
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]  # untyped
        earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]  # untyped
        ends_f = admin.list_offsets({tp: latest for tp in parts}, request_timeout=timeout)
        starts_f = admin.list_offsets({tp: earliest for tp in parts}, request_timeout=timeout)
        group_f = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(self.target.group, parts)], request_timeout=timeout
        )
        committed: dict[int, int] = {}
        for result in group_f[self.target.group].result(timeout).topic_partitions:
            committed[result.partition] = result.offset
        now = time.monotonic()
        lag = 0
        age = 0.0
        for tp in parts:
            end = ends_f[tp].result(timeout).offset
            start = starts_f[tp].result(timeout).offset
            done = committed.get(tp.partition, _NO_OFFSET)
            # No commit yet: the classifiers start from the earliest frame kept.
            done = start if done < 0 else max(done, start)
            state = self._partitions.setdefault(tp.partition, _Partition())
            if not state.moves or state.moves[-1][1] != end:
                state.moves.append((now, end))
            behind = max(0, end - done)
            lag += behind
            if behind:
                age = max(age, oldest_age(state.moves, done, now, self.started))
        return LagReading(lag=lag, age_s=round(age, 3), at=time.time(), partitions=len(parts))


class _ReaderActor:
    """A LagReader in a Ray actor of its own (RemoteLagReader)."""

    def __init__(self, target: dict[str, Any], interval_s: float) -> None:
        self.reader = LagReader(LagTarget(**target), interval_s)

    def latest(self) -> LagReading | None:
        return self.reader.latest()


class RemoteLagReader:
    """The lag read by a small Ray actor (0 CPUs), asked without waiting: each latest() call
    collects the answer to the previous request if it has come, and sends the next.

    Why not a thread in the Serve controller: with a live Kafka connection open in the
    controller process, the controller died (no Python error) as it started the first
    replica, in every run on this machine's local clusters (tests/integration/
    test_autoscale_lag.py); librdkafka never loads in the controller this way, and a reader
    that dies only loses its actor, which is made again on the next tick.
    """

    def __init__(self, target: LagTarget, interval_s: float) -> None:
        self.target, self.interval_s = target, interval_s
        self.name = f"framecast-lag-{abs(hash((target, interval_s))):x}"
        self._actor: Any = None
        self._pending: Any = None
        self._latest: LagReading | None = None

    def _handle(self) -> Any:
        import ray

        if self._actor is None:
            self._actor = (
                ray.remote(_ReaderActor)
                .options(name=self.name, namespace="framecast-autoscale", get_if_exists=True,
                         num_cpus=0, max_restarts=-1, max_task_retries=0)
                .remote(asdict(self.target), self.interval_s)
            )
        return self._actor

    def latest(self) -> LagReading | None:
        """The newest reading this process has (None before the first); never blocks."""
        import ray

        try:
            if self._pending is None:
                self._pending = self._handle().latest.remote()
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                pending, self._pending = self._pending, None
                reading = ray.get(pending)
                if reading is not None:
                    self._latest = reading
        except Exception as error:  # the actor died or could not start: make it again
            logger.warning("framecast lag autoscaler: lag reader actor: %s",
                           type(error).__name__)
            self._actor = self._pending = None
        return self._latest

    def stop(self) -> None:
        """Kill the actor."""
        import ray

        actor, self._actor = self._actor, None
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                logger.debug("lag reader actor already gone")


Reader = LagReader | RemoteLagReader
_READERS: dict[tuple[LagTarget, float], tuple[Reader, int]] = {}
_LOCK = threading.Lock()


def _in_ray_actor() -> bool:
    """Whether this process is a Ray actor's (the Serve controller), not a driver."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def acquire(target: LagTarget, interval_s: float) -> Reader:
    """The process's reader for target (made on first use); pair with release(). Inside a
    Ray worker (the Serve controller) the reader is a Ray actor of its own (RemoteLagReader);
    elsewhere a thread of this process."""
    key = (target, interval_s)
    with _LOCK:
        reader, users = _READERS.get(key, (None, 0))
        if reader is None:
            reader = (RemoteLagReader(target, interval_s) if _in_ray_actor()
                      else LagReader(target, interval_s))
        _READERS[key] = (reader, users + 1)
        return reader


def release(target: LagTarget, interval_s: float) -> None:
    """One user fewer; the last one stops the reader's thread."""
    key = (target, interval_s)
    with _LOCK:
        reader, users = _READERS.get(key, (None, 0))
        if reader is None:
            return
        if users <= 1:
            reader.stop()
            del _READERS[key]
        else:
            _READERS[key] = (reader, users - 1)
