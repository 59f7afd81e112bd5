"""The embedded broker, for real: round trips, topic specs, failures with their log tail."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from cluster.exceptions import BrokerStartError, PortInUseError
from cluster.kafka_broker import EmbeddedKafka
from cluster.processes import free_port
from streams.client import admin_client
from streams.config import KafkaSettings
from streams.exceptions import KafkaConnectionError, TopicSpecError
from streams.topics import TopicSpec, apply_topic_specs, describe_topics, load_topic_specs
from tests.kafka_python import kafka_python_config


def _topic() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def produce(settings: KafkaSettings, topic: str, n: int) -> list[tuple[bytes, bytes]]:
    """Send n keyed records with a header and wait for every ack."""
    sent = [(f"cam-{i % 3}".encode(), f"frame-{i}".encode()) for i in range(n)]
    producer = KafkaProducer(**kafka_python_config(settings), acks="all", enable_idempotence=True)
    for key, value in sent:
        producer.send(topic, key=key, value=value, headers=[("content-type", b"text/plain")])
    producer.flush()
    producer.close()
    return sent


def consume_all(settings: KafkaSettings, topic: str, n: int, group: str | None = None) -> list:
    """Read n records from the beginning of topic (fails the test if they do not come)."""
    consumer = KafkaConsumer(
        topic,
        **kafka_python_config(settings),
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=15_000,
    )
    records = []
    for message in consumer:
        records.append(message)
        if len(records) >= n:
            break
    consumer.close()
    return records


def test_produce_consume_round_trip_keeps_keys_headers_and_per_key_order(
    kafka_settings: KafkaSettings,
) -> None:
    topic = _topic()
    with admin_client(kafka_settings) as admin:
        apply_topic_specs(admin, [TopicSpec(name=topic, partitions=3)])
    sent = produce(kafka_settings, topic, 90)
    got = consume_all(kafka_settings, topic, 90, group="round-trip")
    assert len(got) == 90
    assert sorted((m.key, m.value) for m in got) == sorted(sent)
    assert all(m.headers == [("content-type", b"text/plain")] for m in got)
    for key in {k for k, _ in sent}:
        values = [m.value for m in got if m.key == key]
        assert values == [v for k, v in sent if k == key]  # per-key order preserved


def test_topic_spec_is_applied_idempotently_and_grows(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    name = _topic()
    spec_file = tmp_path / "topics.yaml"
    spec_file.write_text(f"""
topics:
  - name: {name}
    partitions: 2
    config: {{retention.ms: 3600000, max.message.bytes: 2097152}}
""")
    with admin_client(kafka_settings) as admin:
        first = apply_topic_specs(admin, load_topic_specs(spec_file))
        again = apply_topic_specs(admin, load_topic_specs(spec_file))
        grown = apply_topic_specs(
            admin, [TopicSpec(name=name, partitions=5, config={"retention.ms": "60000"})]
        )
        described = describe_topics(admin, [name])[0]
        with pytest.raises(TopicSpecError, match="cannot remove partitions"):
            apply_topic_specs(admin, [TopicSpec(name=name, partitions=1)])
        with pytest.raises(TopicSpecError, match="no such topic"):
            describe_topics(admin, [name + "-missing"])
    assert [c.action for c in first] == ["created"]
    assert [c.action for c in again] == ["unchanged"]
    assert grown[0].action == "updated"
    assert "partitions 2 -> 5" in grown[0].details
    assert described["partitions"] == 5
    assert described["config"]["retention.ms"] == "60000"
    assert described["config"]["max.message.bytes"] == "2097152"


def test_unreachable_cluster_gives_a_clear_error() -> None:
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    with (
        pytest.raises(KafkaConnectionError, match=r"cannot reach Kafka at 127\.0\.0\.1"),
        admin_client(settings),
    ):
        pass


def test_port_in_use_is_refused_before_starting(
    tmp_path: Path, kafka_libs: Path, kafka_broker: EmbeddedKafka
) -> None:
    broker = EmbeddedKafka(tmp_path, libs_dir=kafka_libs, port=kafka_broker.port)
    with pytest.raises(PortInUseError, match=f"kafka port {kafka_broker.port}"):
        broker.start()


def test_broker_that_fails_to_start_reports_its_log_tail(tmp_path: Path, kafka_libs: Path) -> None:
    broker = EmbeddedKafka(
        tmp_path,
        libs_dir=kafka_libs,
        port=free_port(),
        extra_properties={"num.network.threads": "not-a-number"},
    )
    with pytest.raises(BrokerStartError) as excinfo:
        broker.start(timeout=90)
    assert "num.network.threads" in str(excinfo.value)
    assert broker.info() is None
