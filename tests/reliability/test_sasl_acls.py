"""`framecast up --sasl`: SASL_SSL, SCRAM users and ACLs on the embedded broker, as a user
runs it (the CLI, on a home of its own), checked with plain confluent-kafka clients.

``framecast`` may use its topics, group and transactional ids; ``intruder``, a working user
of the same broker, is refused deleting framecast's topics, committing its group's offsets
and fencing its transactional id; a wrong password is refused as an authentication error;
no password is on any command line, in `status --json` or in a file under the home other
than the 0600 ones that must hold it.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from cluster.kafka_security import (
    APP_USER,
    INTRUDER_USER,
    client_overrides,
    credentials_file,
    load_credentials,
    sasl_dir,
)
from cluster.processes import free_port
from cluster.ray_head import RayHeadInfo
from streams.config import REDACTED, KafkaSettings
from tests.conftest import run_cli
from tests.reliability.conftest import Record
from tests.streaming import labels_of, read_topic, tally

pytestmark = pytest.mark.timeout(600)

QUIET = logging.getLogger("tests.sasl.rdkafka")  # librdkafka's own lines, off stderr


class CommandLines:
    """Every command line of every process on the machine, sampled in the background."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.seen: set[str] = set()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> None:
        for proc in psutil.process_iter(["cmdline"]):
            self.seen.add(" ".join(proc.info.get("cmdline") or []))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class SaslStack:
    home: Path
    env: dict[str, str]
    cli_output: list[str] = field(default_factory=list)
    command_lines: set[str] = field(default_factory=set)

    @property
    def bootstrap(self) -> str:
        state = json.loads((self.home / "kafka" / "broker.json").read_text())
        return str(state["bootstrap_servers"])

    def password(self, user: str) -> str:
        credentials = load_credentials(self.home)
        assert credentials is not None
        return credentials.password(user).get_secret_value()

    def secrets(self) -> list[str]:
        credentials = load_credentials(self.home)
        assert credentials is not None
        inter_broker = (self.home / "kafka" / "inter-broker.secret").read_text().strip()
        return [
            *(p.get_secret_value() for p in credentials.users.values()),
            credentials.keystore_password.get_secret_value(),
            inter_broker,
        ]

    def settings(self, user: str = APP_USER) -> KafkaSettings:
        overrides = client_overrides(self.home, user)
        assert overrides is not None
        return KafkaSettings(bootstrap_servers=self.bootstrap, **overrides)

    def rdkafka(self, user: str, password: str | None = None, **more: Any) -> dict[str, Any]:
        config = self.settings(user).rdkafka_config()
        if password is not None:
            config["sasl.password"] = password
        return {**config, "logger": QUIET, **more}

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> Any:
        result = run_cli(*args, home=self.home, env={**self.env, **(env or {})}, timeout=timeout)
        self.cli_output.append(result.stdout + result.stderr)
        return result


@pytest.fixture(scope="module")
def sasl_stack(tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path) -> Iterator[SaslStack]:
    """`framecast up --sasl --no-ray` on a fresh home, every command line watched meanwhile."""
    stack = SaslStack(
        home=tmp_path_factory.mktemp("sasl-home"),
        env={
            "FRAMECAST_KAFKA_LIBS": str(kafka_libs),
            "FRAMECAST_KAFKA_EMBEDDED_PORT": str(free_port()),
            "FRAMECAST_KAFKA_EMBEDDED_HEAP_MB": "384",
        },
    )
    try:
        with CommandLines() as lines:
            up = stack.cli("up", "--sasl", "--no-ray", timeout=300)
        stack.command_lines |= lines.seen
        assert up.returncode == 0, up.stdout + up.stderr
        assert "kafka started" in up.stdout and "SASL_SSL" in up.stdout
        yield stack
    finally:
        stack.cli("down")


def tag() -> str:
    return uuid.uuid4().hex[:8]


def error_of(call: Any) -> KafkaError:
    """The KafkaError a confluent-kafka call (or future's result) raises."""
    with pytest.raises(KafkaException) as raised:
        call()
    error = raised.value.args[0]
    assert isinstance(error, KafkaError)
    return error


def create_topic(config: dict[str, Any], name: str) -> None:
    admin = AdminClient(config)  # kept alive until its future is done
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(timeout=30)


def transactional_producer(config: dict[str, Any], transactional_id: str) -> Producer:
    producer = Producer({**config, "transactional.id": transactional_id})
    producer.init_transactions(30)
    return producer


def committed_offset(config: dict[str, Any], group: str, topic: str) -> int:
    consumer = Consumer({**config, "group.id": group, "enable.auto.commit": False})
    try:
        [partition] = consumer.committed([TopicPartition(topic, 0)], timeout=30)
        return int(partition.offset)
    finally:
        consumer.close()


def read_committed(config: dict[str, Any], group: str, topic: str, expected: int) -> list[bytes]:
    """Read ``expected`` committed records as ``group`` and commit their offsets."""
    consumer = Consumer(
        {
            **config,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    values: list[bytes] = []
    try:
        consumer.subscribe([topic])
        for _ in range(120):
            message = consumer.poll(0.5)
            if message is None:
                if len(values) >= expected:
                    break
                continue
            assert message.error() is None, message.error()
            values.append(message.value())
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return values


def test_framecast_produces_consumes_commits_and_uses_transactions(
    sasl_stack: SaslStack, figures: Record
) -> None:
    me = sasl_stack.rdkafka(APP_USER)
    topic, group, txn = f"frames-{tag()}", f"framecast-{tag()}", f"framecast-{tag()}"
    create_topic(me, topic)
    producer = transactional_producer(me, txn)
    producer.begin_transaction()
    for index in range(5):
        producer.produce(topic, value=f"frame-{index}".encode())
    producer.commit_transaction(30)
    aborted = transactional_producer(me, txn)  # a new generation of the same id: allowed
    aborted.begin_transaction()
    aborted.produce(topic, value=b"aborted")
    aborted.abort_transaction(30)
    values = read_committed(me, group, topic, 5)
    assert values == [f"frame-{i}".encode() for i in range(5)]
    assert committed_offset(me, group, topic) >= 6  # past the 5 records and a txn marker
    figures(records=5, aborted_records_seen=values.count(b"aborted"))


def test_intruder_cannot_delete_commit_or_fence_what_is_framecasts(
    sasl_stack: SaslStack, figures: Record
) -> None:
    me = sasl_stack.rdkafka(APP_USER)
    intruder = sasl_stack.rdkafka(INTRUDER_USER)
    topic, group, txn = f"frames-{tag()}", f"framecast-{tag()}", f"framecast-{tag()}"
    create_topic(me, topic)
    framecast = transactional_producer(me, txn)
    framecast.begin_transaction()
    framecast.produce(topic, value=b"before")
    framecast.commit_transaction(30)
    assert read_committed(me, group, topic, 1) == [b"before"]
    offset = committed_offset(me, group, topic)

    # A working user, on its own resources: its credentials are good, so what follows is
    # the authorizer speaking, not authentication.
    own = f"intruder-{tag()}"
    create_topic(intruder, own)
    probe = Producer(intruder)
    probe.produce(own, b"mine")
    assert probe.flush(30) == 0
    assert topic not in AdminClient(intruder).list_topics(timeout=30).topics

    admin = AdminClient(intruder)
    deleted = admin.delete_topics([topic], operation_timeout=30)[topic]
    refused_delete = error_of(lambda: deleted.result(timeout=60))
    assert refused_delete.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, refused_delete

    # OffsetCommit for framecast's group (the group ACL refuses it at FindCoordinator or at
    # OffsetCommit; either way the code is the group's).
    moved = admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, 0)])]
    )[group]
    refused_commit = error_of(lambda: moved.result(timeout=60))
    assert refused_commit.code() == KafkaError.GROUP_AUTHORIZATION_FAILED, refused_commit

    # framecast has a transaction open; InitProducerId with its id would fence it.
    framecast.begin_transaction()
    framecast.produce(topic, value=b"during")
    impostor = Producer({**intruder, "transactional.id": txn})
    refused_fence = error_of(lambda: impostor.init_transactions(30))
    assert refused_fence.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, refused_fence
    framecast.commit_transaction(30)  # not fenced

    # Nothing changed: the topic, the group's offset, both records.
    assert topic in AdminClient(me).list_topics(timeout=30).topics
    assert committed_offset(me, group, topic) == offset
    assert read_committed(me, f"framecast-{tag()}", topic, 2) == [b"before", b"during"]
    figures(
        delete_topics=refused_delete.name(),
        offset_commit=refused_commit.name(),
        init_producer_id=refused_fence.name(),
    )


def test_a_wrong_password_is_refused_as_authentication(sasl_stack: SaslStack) -> None:
    wrong = "wrong-" + uuid.uuid4().hex
    errors: list[KafkaError] = []
    admin = AdminClient(sasl_stack.rdkafka(APP_USER, wrong, error_cb=errors.append))
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)
    admin.poll(1)
    refusals = [e for e in errors if e.code() == KafkaError._AUTHENTICATION]
    assert refusals, [e.str() for e in errors]
    assert "authentication" in refusals[0].str().lower()
    assert all(wrong not in e.str() for e in errors)

    # The CLI takes the home's user and CA, with the password given: exit 1, one plain line.
    result = sasl_stack.cli(
        "topics",
        "list",
        env={
            "FRAMECAST_KAFKA_SASL_PASSWORD": wrong,
            "FRAMECAST_KAFKA_REQUEST_TIMEOUT_MS": "8000",
        },
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"refused the SASL authentication of user {APP_USER!r}" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_cli_commands_connect_as_framecast_after_up_sasl(
    sasl_stack: SaslStack, ray_head: RayHeadInfo, reliability_app: str, figures: Record
) -> None:
    applied = sasl_stack.cli("topics", "apply")
    assert applied.returncode == 0, applied.stderr
    assert "frames: created" in applied.stdout
    produced = sasl_stack.cli(
        "produce", "--source", "fashion-mnist", "--count", "40", "--streams", "2",
        "--fps", "0", "--encoding", "png", "--json",
    )
    assert produced.returncode == 0, produced.stderr
    summary = json.loads(produced.stdout)
    ran = sasl_stack.cli(
        "--ray-address", ray_head.address,
        "stream", "run", "--app-name", reliability_app,
        "--guarantee", "exactly-once", "--idle-exit-s", "5",
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    totals = json.loads(ran.stdout.strip().splitlines()[-1])
    expected = {(stream, index) for stream in summary["stream_ids"] for index in range(40)}
    labels = labels_of(
        read_topic(sasl_stack.settings(), "labels", len(expected), committed_only=True)
    )
    counts = tally(expected, labels)
    figures(**counts, protocol="SASL_SSL", mechanism="SCRAM-SHA-512", guarantee="exactly-once")
    assert counts["losses"] == 0 and counts["duplicates"] == 0, counts
    assert totals["labelled"] == len(expected)
    status = sasl_stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["kafka"]["healthy"] is True
    assert report["kafka"]["security_protocol"] == "SASL_SSL"
    assert report["settings"]["kafka"]["sasl_username"] == APP_USER
    assert report["settings"]["kafka"]["sasl_password"] == REDACTED
    assert {"frames", "labels", "latency", "frames.dlq"} <= {
        t["name"] for t in report["kafka"]["topics"]
    }


def test_a_restart_without_the_flag_stays_secured(sasl_stack: SaslStack) -> None:
    passwords = sasl_stack.secrets()
    assert sasl_stack.cli("down").returncode == 0
    with CommandLines() as lines:
        up = sasl_stack.cli("up", "--no-ray", timeout=300)
    sasl_stack.command_lines |= lines.seen
    assert up.returncode == 0, up.stdout + up.stderr
    assert "kafka started" in up.stdout and "SASL_SSL" in up.stdout
    assert sasl_stack.secrets() == passwords  # the same users, not new ones
    listed = sasl_stack.cli("topics", "list")
    assert listed.returncode == 0, listed.stderr
    # The ACLs live in the metadata log and still hold.
    topic = f"frames-{tag()}"
    create_topic(sasl_stack.rdkafka(APP_USER), topic)
    intruder = AdminClient(sasl_stack.rdkafka(INTRUDER_USER))
    deleted = intruder.delete_topics([topic])[topic]
    assert error_of(lambda: deleted.result(timeout=60)).code() == (
        KafkaError.TOPIC_AUTHORIZATION_FAILED
    )


def test_no_password_on_a_command_line_in_status_or_in_the_home(sasl_stack: SaslStack) -> None:
    """Last in the module: every command line seen while the broker started (twice), those
    of the broker's process tree now, every CLI output, every file under the home."""
    secrets = sasl_stack.secrets()
    assert len(set(secrets)) == 4 and all(len(s) >= 24 for s in secrets)
    state = json.loads((sasl_stack.home / "kafka" / "broker.json").read_text())
    broker = psutil.Process(state["pid"])
    tree = [broker, *broker.children(recursive=True)]
    lines = CommandLines()
    lines.snapshot()
    seen = sasl_stack.command_lines | lines.seen | {" ".join(p.cmdline()) for p in tree}
    assert any("kafka.tools.StorageTool" in line for line in sasl_stack.command_lines), (
        "the sampler never saw the storage being formatted"
    )
    assert any("kafka.Kafka" in line for line in seen)
    status = sasl_stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    for secret in secrets:
        assert not [line for line in seen if secret in line], "a password on a command line"
        assert all(secret not in output for output in sasl_stack.cli_output), "in CLI output"

    allowed = {
        credentials_file(sasl_stack.home),
        sasl_dir(sasl_stack.home) / "broker.p12",
        sasl_stack.home / "kafka" / "server.properties",
        sasl_stack.home / "kafka" / "inter-broker.secret",
    }
    for path in allowed:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    assert sasl_dir(sasl_stack.home).stat().st_mode & 0o077 == 0
    scanned = 0
    for path in sasl_stack.home.rglob("*"):
        if not path.is_file() or path in allowed or "libs" in path.parts:
            continue
        data = path.read_bytes()
        scanned += 1
        for secret in secrets:
            assert secret.encode() not in data, f"a password in {path}"
    assert scanned > 3  # broker.log, broker.json, ports.json, log4j2.properties, ca.pem...
