"""A consumer group's lag on a topic, read in the background for the lag autoscaling policy.

The policy (serving.autoscale) runs inside the Serve controller once per control-loop tick, so
it must never wait on Kafka: a daemon thread here reads the group's committed offsets and the
topic's end offsets with the Kafka admin API every ``interval_s`` and keeps the latest
reading; the policy only reads that. A Kafka that is down leaves the last good reading in
place (its ``at`` ages, and the policy holds the replica count once it is stale).

The age of the oldest unlabelled frame is worked out without reading any frame: the thread
keeps, per partition, the times at which the end offset moved; the oldest unlabelled frame
of a partition (at its committed offset c) arrived no later than the first reading whose end
offset was past c. Frames older than the thread are counted from the thread's start (a
lower bound). Resolution: one ``interval_s``.

This module is imported by reference from the controller (Serve pickles the policy's own
module by value), so its registry is one per process: policies re-made on every deployment
update share one reader per (bootstrap, group, topic) instead of starting a thread each.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
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
            "log.connection.close": False,
            "logger": logging.getLogger("framecast.autoscale.rdkafka"),
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
    """One reading: total lag (frames), oldest unlabelled frame's age (s), when (monotonic)."""

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
        return LagReading(lag=lag, age_s=round(age, 3), at=now, partitions=len(parts))


_READERS: dict[tuple[LagTarget, float], tuple[LagReader, int]] = {}
_LOCK = threading.Lock()


def acquire(target: LagTarget, interval_s: float) -> LagReader:
    """The process's reader for target (started on first use); pair with release()."""
    key = (target, interval_s)
    with _LOCK:
        reader, users = _READERS.get(key, (None, 0))
        if reader is None:
            reader = LagReader(target, interval_s)
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
