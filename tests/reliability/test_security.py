"""Security: the embedded broker behind SASL_SSL (SCRAM, a CA this test makes), framecast
connecting through its settings, wrong credentials refused clearly, secrets never shown.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from cluster.kafka_broker import BrokerSecurity, EmbeddedKafka
from cluster.processes import free_port
from streams.client import admin_client
from streams.config import KafkaSettings
from streams.exceptions import KafkaConnectionError
from streams.producers import produce_frames
from tests.conftest import run_cli
from tests.reliability.conftest import Record
from tests.streaming import labels_of, read_topic, run_classifier, tally, topics
from tests.tls import ThrowawayCA, make_ca_and_keystore

pytestmark = pytest.mark.timeout(420)

USER = "framecast-app"
# Made per run; a test fails if any of them shows up where it must not.
PASSWORD = "pw-" + secrets.token_urlsafe(18).replace("-", "_")
KEYSTORE_PASSWORD = "ks-" + secrets.token_urlsafe(18).replace("-", "_")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    return make_ca_and_keystore(tmp_path_factory.mktemp("tls"), KEYSTORE_PASSWORD)


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path, tls: ThrowawayCA
) -> Iterator[EmbeddedKafka]:
    security = BrokerSecurity(
        keystore=tls.keystore,
        keystore_password=SecretStr(KEYSTORE_PASSWORD),
        ca_file=tls.ca_file,
        scram_users={USER: SecretStr(PASSWORD)},
    )
    broker = EmbeddedKafka(
        tmp_path_factory.mktemp("secure-kafka"),
        libs_dir=kafka_libs,
        port=free_port(),
        heap_mb=256,
        security=security,
    )
    broker.start(timeout=180)
    yield broker
    broker.stop()


def secure_settings(broker: EmbeddedKafka, tls: ThrowawayCA, **overrides: object) -> KafkaSettings:
    values: dict[str, object] = {
        "bootstrap_servers": broker.bootstrap_servers,
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": USER,
        "sasl_password": PASSWORD,
        "ssl_cafile": tls.ca_file,
        **overrides,
    }
    return KafkaSettings(**values)  # type: ignore[arg-type]


def secure_env(broker: EmbeddedKafka, tls: ThrowawayCA, password: str = PASSWORD) -> dict[str, str]:
    return {
        "FRAMECAST_KAFKA_BOOTSTRAP": broker.bootstrap_servers,
        "FRAMECAST_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FRAMECAST_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "FRAMECAST_KAFKA_SASL_USERNAME": USER,
        "FRAMECAST_KAFKA_SASL_PASSWORD": password,
        "FRAMECAST_KAFKA_SSL_CAFILE": str(tls.ca_file),
        "FRAMECAST_KAFKA_REQUEST_TIMEOUT_MS": "8000",
    }


def assert_no_secret(text: str, where: str) -> None:
    for secret in (PASSWORD, KEYSTORE_PASSWORD):
        assert secret not in text, f"a secret appears in {where}"


def test_frames_flow_through_sasl_ssl_with_framecast_settings(
    secure_broker: EmbeddedKafka,
    tls: ThrowawayCA,
    reliability_app: str,
    figures: Record,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = secure_settings(secure_broker, tls)
    caplog.set_level(logging.DEBUG)
    config = topics(settings, partitions=2)
    summary = produce_frames(
        settings,
        None,
        "fashion-mnist",
        config.frames_topic,
        fps=0,
        streams=2,
        count=60,
        encoding="png",
        create_topic=False,
    )
    expected = {(stream, index) for stream in summary["stream_ids"] for index in range(60)}
    totals = run_classifier(settings, config, reliability_app)
    labels = labels_of(read_topic(settings, config.labels_topic, len(expected)))
    counts = tally(expected, labels)
    figures(**counts, protocol="SASL_SSL", mechanism="SCRAM-SHA-512")
    assert counts["losses"] == 0 and counts["duplicates"] == 0 and counts["unexpected"] == 0
    assert totals["labelled"] == len(expected)
    # Nothing this process logged (kafka-python at DEBUG included), no repr, no dump.
    assert_no_secret(caplog.text, "the logs")
    assert_no_secret(repr(settings) + str(settings), "the settings repr")
    assert_no_secret(settings.model_dump_json(), "the settings JSON")
    assert_no_secret(repr(secure_broker.security), "the broker security repr")
    assert_no_secret(Path(secure_broker.log_file).read_text(), "the broker log")
    assert secure_broker.config_file.stat().st_mode & 0o077 == 0, "server.properties is readable"


def test_plaintext_and_anonymous_clients_are_not_let_in(
    secure_broker: EmbeddedKafka, tls: ThrowawayCA
) -> None:
    plaintext = KafkaSettings(
        bootstrap_servers=secure_broker.bootstrap_servers, request_timeout_ms=5000
    )
    with pytest.raises(KafkaConnectionError), admin_client(plaintext):
        pass
    # TLS but no SASL: the broker requires the SASL handshake.
    tls_only = KafkaSettings(
        bootstrap_servers=secure_broker.bootstrap_servers,
        security_protocol="SSL",
        ssl_cafile=tls.ca_file,
        request_timeout_ms=5000,
    )
    with pytest.raises(KafkaConnectionError), admin_client(tls_only):
        pass


def test_wrong_credentials_fail_with_a_clear_error_that_keeps_the_secret(
    secure_broker: EmbeddedKafka, tls: ThrowawayCA, tmp_path: Path
) -> None:
    wrong = "wrong-" + PASSWORD
    settings = secure_settings(secure_broker, tls, sasl_password=wrong, request_timeout_ms=8000)
    refused = "refused the SASL authentication of user"
    with pytest.raises(KafkaConnectionError, match=refused) as err, admin_client(settings):
        pass
    assert USER in str(err.value) and wrong not in str(err.value)
    # The CLI: exit 1 and the same plain message, no traceback, no secret.
    result = run_cli(
        "-v",
        "topics",
        "list",
        home=tmp_path,
        env=secure_env(secure_broker, tls, wrong),
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused the SASL authentication" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_status_json_reports_a_healthy_secure_broker_without_secrets(
    secure_broker: EmbeddedKafka, tls: ThrowawayCA, tmp_path: Path
) -> None:
    result = run_cli(
        "-v",
        "status",
        "--json",
        home=tmp_path,
        env=secure_env(secure_broker, tls),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_secret(result.stdout, "status --json")
    assert_no_secret(result.stderr, "the CLI's verbose log")
    report = json.loads(result.stdout)
    assert report["kafka"]["healthy"] is True
    assert report["settings"]["kafka"]["security_protocol"] == "SASL_SSL"
    assert report["settings"]["kafka"]["sasl_password"] == "**********"
