"""Bad configuration fails at start-up, before anything connects, and the error names the field.

Through the real CLI (exit code 2 = invalid configuration, contracts.md) and, for a topic
that does not exist, through the stream classifier against the real broker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import KafkaSettings
from streams.exceptions import StreamsError
from tests.conftest import SHIPPED_MODEL, run_cli
from tests.reliability.conftest import Record
from tests.streaming import classifier, topics

pytestmark = pytest.mark.timeout(300)

# name -> (CLI args, env, the text the error must contain)
CASES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "max_replicas below min_replicas": (
        ["serve", "deploy", str(SHIPPED_MODEL), "--min-replicas", "3", "--max-replicas", "1"],
        {},
        "max_replicas (1) must be >= min_replicas (3)",
    ),
    "zero max_replicas from env": (
        ["serve", "status"],
        {"FRAMECAST_SERVE_MAX_REPLICAS": "0"},
        "serve.max_replicas: Input should be greater than 0",
    ),
    "unknown security_protocol": (
        ["status", "--json"],
        {"FRAMECAST_KAFKA_SECURITY_PROTOCOL": "SASL_TLS"},
        "kafka.security_protocol: Input should be 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT' or "
        "'SASL_SSL'",
    ),
    "SASL without credentials": (
        ["topics", "list"],
        {"FRAMECAST_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
        "needs sasl_mechanism, sasl_username, sasl_password",
    ),
    "missing CA file": (
        ["topics", "list"],
        {"FRAMECAST_KAFKA_SECURITY_PROTOCOL": "SSL", "FRAMECAST_KAFKA_SSL_CAFILE": "/no/ca.pem"},
        "ssl_cafile: no such file: /no/ca.pem",
    ),
    "empty frames topic name": (
        ["stream", "run"],
        {"FRAMECAST_TOPICS_FRAMES": ""},
        "topics.frames: String should have at least 1 character",
    ),
    "unknown guarantee": (
        ["stream", "run", "--guarantee", "exactly-twice"],
        {},
        "guarantee: Input should be 'at-least-once' or 'exactly-once'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_configuration_fails_at_start_up_naming_the_field(
    case: str, tmp_path: Path, figures: Record
) -> None:
    args, env, message = CASES[case]
    result = run_cli(*args, home=tmp_path, env=env, timeout=120)
    figures(exit_code=result.returncode, error=result.stderr.strip()[-200:])
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "kafka").exists() and not (tmp_path / "ray").exists()


def test_a_missing_frames_topic_fails_at_start_up_naming_it(
    kafka_settings: KafkaSettings, reliability_app: str, figures: Record
) -> None:
    config = topics(kafka_settings).model_copy(
        update={"frames_topic": "no-such-frames-topic", "topic_wait_s": 3.0}
    )
    with pytest.raises(StreamsError, match="frames_topic: topic 'no-such-frames-topic'") as err:
        classifier(kafka_settings, config, reliability_app)
    figures(error=str(err.value))
