"""Broker faults under a running stream: a broker crash and restart, and one node of a
three-node cluster killed for good. The input set must equal the output set.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.kafka_broker import EmbeddedKafka, EmbeddedKafkaCluster
from cluster.processes import wait_until
from streams.client import admin_client
from streams.config import KafkaSettings
from streams.topics import describe_topics
from tests.reliability.conftest import Record, own_broker
from tests.streaming import Feeder, LabelProbe, stream_through_fault, topics

pytestmark = pytest.mark.timeout(480)


def _crash(broker: EmbeddedKafka) -> int:
    info = broker.info()
    assert info is not None, "the broker is not running"
    os.kill(info.pid, signal.SIGKILL)
    return info.pid


@pytest.fixture(scope="module")
def lone_broker(
    tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path
) -> Iterator[EmbeddedKafka]:
    """A single broker of this module's own: it gets killed."""
    with own_broker(tmp_path_factory.mktemp("restart-kafka"), kafka_libs) as broker:
        yield broker


def test_broker_crash_and_restart_mid_stream_loses_nothing(
    lone_broker: EmbeddedKafka, reliability_app: str, figures: Record
) -> None:
    settings = KafkaSettings(bootstrap_servers=lone_broker.bootstrap_servers)
    config = topics(settings, partitions=2).model_copy(update={"max_batch_frames": 16})

    def crash_and_restart(probe: LabelProbe, feeder: Feeder) -> float:
        _crash(lone_broker)  # SIGKILL: no clean shutdown, data as the crash left it on disk
        down_at = time.monotonic()
        time.sleep(3)
        lone_broker.start()  # same data directory, same ports
        return time.monotonic() - down_at

    run = stream_through_fault(
        settings,
        config,
        reliability_app,
        crash_and_restart,
        streams=2,
        per_stream=200,
        fps=20.0,
        fault_after=80,
    )
    counts = run.counts
    figures(**counts, broker_down_s=round(run.outcome, 1), labelled=run.totals["labelled"])
    assert counts["losses"] == 0 and counts["unexpected"] == 0, counts
    assert counts["labels_received"] == run.totals["labelled"]  # every label sent arrived


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path
) -> Iterator[EmbeddedKafkaCluster]:
    """Three broker+controller nodes, 256 MiB heaps, RF 3, min.insync.replicas 2."""
    nodes = EmbeddedKafkaCluster(
        tmp_path_factory.mktemp("kafka-cluster"), libs_dir=kafka_libs, nodes=3, heap_mb=256
    )
    nodes.start(timeout=300)
    yield nodes
    nodes.stop()


# At-least-once only: under exactly-once, kafka-python's transactional calls either raised
# ProducerFencedError (the classifier then stops) or blocked past the test's limit after the
# node loss in 2 of 3 runs on the development machine; see docs/reliability.md.
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_one_of_three_brokers_killed_mid_stream_loses_nothing(
    cluster: EmbeddedKafkaCluster, reliability_app: str, figures: Record, guarantee: str
) -> None:
    # The previous case left a node down: bring it back, and wait until it has caught up,
    # or killing another node would take partitions below min.insync.replicas (two faults).
    cluster.start(timeout=300)
    cluster.wait_in_sync(timeout=180)
    settings = KafkaSettings(bootstrap_servers=cluster.bootstrap_servers)
    config = topics(settings, partitions=3, replication_factor=3).model_copy(
        update={"guarantee": guarantee, "max_batch_frames": 16}
    )
    with admin_client(settings) as admin:
        # This client may ask a broker whose metadata has not caught up with the creation yet
        # (seen once on a loaded 2-core CI run): the topic is there once any broker says so.
        assert wait_until(lambda: config.frames_topic in admin.topic_names(), timeout=60)
        described = describe_topics(admin, [config.frames_topic])[0]
    assert described["replication_factor"] == 3

    def kill_a_leader(probe: LabelProbe, feeder: Feeder) -> int:
        # Kill the node that leads partition 0 of the frames topic (and likely more).
        with admin_client(settings) as admin:
            partition = admin.describe_partitions([config.frames_topic])[config.frames_topic][0]
        leader = partition.leader
        _crash(cluster.node(leader))
        return leader

    run = stream_through_fault(
        settings,
        config,
        reliability_app,
        kill_a_leader,
        streams=3,
        per_stream=150,
        fps=15.0,
        fault_after=90,
    )
    counts = run.counts
    figures(guarantee=guarantee, **counts, killed_node=run.outcome, labelled=run.totals["labelled"])
    assert counts["losses"] == 0 and counts["unexpected"] == 0, counts
    if guarantee == "exactly-once":
        assert counts["duplicates"] == 0, counts
