"""The commit path: offsets are committed only after everything before them is written.

:meth:`Checkpoint.commit`, at-least-once:
  1. flush the producer: every label and dead letter is acknowledged by the brokers (acks=all);
  2. look at what was refused: any refusal means these offsets must not be committed - the
     work since the last commit is redone (a record that can never be written is routed
     differently on the second pass; see :mod:`streams.output`);
  3. only then commit the offsets. Never the other way round: a crash between 1 and 3
     re-labels frames (deduplicable by ``source``), and never loses one.
Exactly-once:
  1. open the transaction (if nothing did yet);
  2. a refusal aborts it;
  3. add the offsets to it, with the consumer group's metadata of when the oldest record
     still held was polled (a rebalance since then makes the coordinator refuse them, and
     the work is redone, not committed twice - KIP-447);
  4. commit it: labels and offsets become visible at once, or - on failure - it is aborted.
Each wait is bounded (60 s): a broker that is away makes the commit wait for the next
interval, never the loop wait forever.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Counter

from streams.batching import Partition
from streams.client import rdkafka_reason
from streams.output import Output

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 60.0
LATENCY_PAUSE_S = 60.0  # no latency aggregates for this long after one was refused
SEND_FAILURES = Counter(
    "framecast_stream_send_failures_total", "Label/DLQ records the brokers never acknowledged."
)


class Outcome(enum.Enum):
    """What a commit did."""

    NOTHING = "nothing"  # no offsets were done since the last commit
    COMMITTED = "committed"
    WAITING = "waiting"  # records still unacknowledged: the offsets wait for the next try
    REDO = "redo"  # refused or aborted: the work since the last commit must be read again
    FAILED = "failed"  # the coordinator refused the offsets (a rebalance): redone elsewhere


class Checkpoint:
    """The offsets done since the last commit, and the commit itself."""

    def __init__(
        self, consumer: Consumer, output: Output, *, exactly_once: bool, interval_ms: float
    ) -> None:
        self.consumer = consumer
        self.output = output
        self.exactly_once = exactly_once
        self.interval_s = interval_ms / 1000
        self.offsets: dict[Partition, int] = {}
        self.last_commit = time.monotonic()
        self.txn_group: Any = None  # exactly-once: see step 3
        self.last_refusal = ""

    def done(self, offsets: dict[Partition, int]) -> None:
        """Record that everything before these offsets is labelled or dead-lettered."""
        for tp, offset in offsets.items():
            if offset > self.offsets.get(tp, -1):
                self.offsets[tp] = offset

    def polled(self) -> None:
        """Note that a record was polled (exactly-once: its group metadata is kept)."""
        if self.exactly_once and self.txn_group is None:
            self.txn_group = self.consumer.consumer_group_metadata()

    def due(self) -> bool:
        """Whether the commit interval has passed."""
        return time.monotonic() - self.last_commit >= self.interval_s

    def forget(self) -> None:
        """Drop the offsets done since the last commit (their work is being redone)."""
        self.offsets.clear()
        self.txn_group = None

    def commit(self, reason: str) -> Outcome:
        """Commit the offsets done since the last commit (see the module docstring)."""
        self.last_commit = time.monotonic()
        if not self.offsets:
            return Outcome.NOTHING
        if self.exactly_once:
            return self._commit_transaction(reason)
        # 1. flush: every label/DLQ record is acknowledged by the brokers (acks=all) ...
        left = self.output.flush(FLUSH_TIMEOUT_S)
        if left:
            log.warning("%d label/DLQ records unacknowledged after %g s; commit (%s) waits",
                        left, FLUSH_TIMEOUT_S, reason)
            return Outcome.WAITING
        # 2. ... nothing was refused ...
        if self._refused(reason):
            return Outcome.REDO
        # 3. ... and only then the offsets: a crash in between re-labels, never loses.
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]
        self.offsets.clear()
        try:
            for committed in self.consumer.commit(offsets=offsets, asynchronous=False) or []:
                if committed.error is not None:
                    log.warning("commit (%s) of %s[%d] failed: %s; that work will be redone",
                                reason, committed.topic, committed.partition, committed.error)
        except KafkaException as error:
            # Typically a rebalance took partitions away (the group generation moved on).
            log.warning("commit (%s) failed: %s; uncommitted work will be redone",
                        reason, rdkafka_reason(error))
            return Outcome.FAILED
        log.debug("committed (%s)", reason)
        return Outcome.COMMITTED

    def _commit_transaction(self, reason: str) -> Outcome:
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]
        try:
            # 1. the transaction is open (the labels were produced in it) ...
            self.output.begin()
            # 2. ... nothing was refused (flush: delivery reports of this transaction) ...
            self.output.flush(FLUSH_TIMEOUT_S)
            if self._refused(reason):
                self.output.abort()
                return Outcome.REDO
            # 3. + 4. ... offsets and labels become visible together.
            group = self.txn_group or self.consumer.consumer_group_metadata()
            self.output.commit_transaction(offsets, group)
        except KafkaException as error:
            log.warning("transaction (%s) failed: %s; aborted, its work will be redone",
                        reason, rdkafka_reason(error))
            self.output.abort()
            return Outcome.REDO
        self.offsets.clear()
        log.debug("committed transaction (%s)", reason)
        return Outcome.COMMITTED

    def _refused(self, reason: str) -> bool:
        refusals = self.output.learn()
        aggregates = [r for r in refusals if r.kind == "latency"]
        if aggregates:
            # A latency aggregate protects no frame: it is not redone, and aggregates pause
            # for a while (in a transaction it fails the commit anyway - once).
            self.output.pause_latency(LATENCY_PAUSE_S)
            log.warning("latency aggregates refused (%s: %s); paused for %g s",
                        aggregates[0].topic, aggregates[0].reason, LATENCY_PAUSE_S)
            if not self.exactly_once:
                refusals = [r for r in refusals if r.kind != "latency"]
        if not refusals:
            return False
        SEND_FAILURES.inc(len(refusals))
        first = refusals[0]
        learned = sum(1 for r in refusals if r.too_large and r.source is not None)
        self.last_refusal = f"{first.topic}: {first.reason}"
        log.error(
            "%d label/DLQ records were refused (%s%s); not committing (%s), the work since "
            "the last commit is redone%s",
            len(refusals),
            self.last_refusal,
            "" if len(refusals) == 1 else ", ...",
            reason,
            f" ({learned} too large for their topic: those frames go to the DLQ instead, "
            "or a dead letter without its value)" if learned else "",
        )
        return True
