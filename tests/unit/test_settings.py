"""Typed settings: validation names the field, env vars override, secrets stay secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.settings import SettingsError, load_settings
from streams.config import KafkaSettings
from tests.conftest import run_cli

SECRET = "s3cr3t-pw-xyz"


def test_unknown_security_protocol_from_env_names_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAMECAST_KAFKA_SECURITY_PROTOCOL", "PLAINTXT")
    with pytest.raises(SettingsError, match=r"kafka\.security_protocol: Input should be"):
        load_settings()


def test_max_replicas_below_min_replicas_is_rejected() -> None:
    with pytest.raises(
        SettingsError, match=r"serve: .*max_replicas \(1\) must be >= min_replicas \(3\)"
    ):
        load_settings(serve={"min_replicas": 3, "max_replicas": 1})


def test_sasl_protocol_requires_credentials() -> None:
    with pytest.raises(SettingsError, match="needs sasl_mechanism, sasl_username, sasl_password"):
        load_settings(kafka={"security_protocol": "SASL_SSL"})


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"ssl_cafile: no such file"):
        load_settings(kafka={"security_protocol": "SSL", "ssl_cafile": tmp_path / "ca.pem"})


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"ray\.adress: Extra inputs are not permitted"):
        load_settings(ray={"adress": "x"})


def test_env_vars_select_existing_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMECAST_KAFKA_BOOTSTRAP", "k1:9092,k2:9092")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("FRAMECAST_SERVE_MAX_REPLICAS", "6")
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert not settings.kafka.uses_embedded_broker
    assert settings.ray.address == "ray://head:10001"
    assert settings.serve.max_replicas == 6
    assert settings.kafka.rdkafka_config()["bootstrap.servers"] == "k1:9092,k2:9092"


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMECAST_KAFKA_BOOTSTRAP", "from-env:9092")
    settings = load_settings(kafka={"bootstrap_servers": "from-flag:9092"})
    assert settings.kafka.bootstrap_servers == "from-flag:9092"


def test_secrets_are_redacted_in_repr_str_and_dump() -> None:
    settings = load_settings(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "svc",
            "sasl_password": SECRET,
            "ssl_password": SECRET,
        }
    )
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)
    assert SECRET not in repr(settings.kafka)
    assert SECRET not in str(settings.redacted())
    assert settings.redacted()["kafka"]["sasl_password"] == "**********"
    # ... but the Kafka client does get the real value.
    assert settings.kafka.rdkafka_config()["sasl.password"] == SECRET


def test_rdkafka_config_for_plaintext_has_no_security_extras() -> None:
    config = KafkaSettings(bootstrap_servers="h:1").rdkafka_config()
    assert config["security.protocol"] == "plaintext"
    assert not any(key.startswith(("sasl.", "ssl.")) for key in config)


def test_cli_rejects_bad_config_at_start_up_naming_the_field(tmp_path: Path) -> None:
    result = run_cli(
        "status",
        "--json",
        home=tmp_path,
        env={"FRAMECAST_SERVE_MIN_REPLICAS": "4", "FRAMECAST_SERVE_MAX_REPLICAS": "2"},
    )
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "max_replicas (2) must be >= min_replicas (4)" in result.stderr


def test_the_classifier_settings_are_a_section_of_the_one_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAMECAST_STREAM_MAX_IN_FLIGHT", "5")
    monkeypatch.setenv("FRAMECAST_TOPICS_FRAMES", "cams")
    settings = load_settings(stream={"group": "g1"}, topics={"max_message_bytes": 2 * 2**20})
    assert settings.stream.max_in_flight == 5 and settings.stream.group == "g1"
    # Topic names and the DLQ value limit follow the topics section unless set for it.
    assert settings.stream.frames_topic == "cams"
    assert settings.stream.dlq_max_value_bytes == 2 * 2**20 - 64 * 1024
    assert settings.redacted()["stream"]["max_in_flight"] == 5
    own = load_settings(stream={"frames_topic": "mine"})
    assert own.stream.frames_topic == "mine"


def test_a_bad_classifier_setting_fails_at_start_up_naming_the_field(tmp_path: Path) -> None:
    result = run_cli(
        "status", "--json", home=tmp_path, env={"FRAMECAST_STREAM_GUARANTEE": "at-most-once"}
    )
    assert result.returncode == 2
    assert "stream.guarantee: Input should be 'at-least-once' or 'exactly-once'" in result.stderr


def test_status_json_prints_the_classifier_settings(tmp_path: Path) -> None:
    result = run_cli(
        "status", "--json", home=tmp_path, env={"FRAMECAST_STREAM_MAX_BATCH_FRAMES": "64"}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["stream"]["max_batch_frames"] == 64


def test_a_run_on_topics_of_its_own_takes_their_names_unless_set_for_the_classifier() -> None:
    from streams.topics import run_topics

    settings = load_settings()
    own = run_topics(settings.topics, "demo", partitions=2)
    config = settings.stream.model_copy(update={"group": "g"}).follow_topics(own)
    assert (config.frames_topic, config.labels_topic) == (own.frames, own.labels)
    assert config.group == "g"
    pinned = load_settings(stream={"frames_topic": "mine"}).stream.follow_topics(own)
    assert (pinned.frames_topic, pinned.dlq_topic) == ("mine", own.dlq)
