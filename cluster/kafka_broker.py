"""The embedded Apache Kafka broker: a real KRaft broker run from Maven jars.

Life cycle: ``resolve_jars`` (Maven, cached) -> ``format`` the storage once
(``kafka.tools.StorageTool format --standalone``) -> ``start`` ``kafka.Kafka`` as a detached
process -> wait until it answers metadata requests -> ``stop`` (SIGTERM, then wait).
The data directory survives restarts, and so does the controller port, because a
standalone KRaft quorum records its voter endpoint at format time.

Two variants for production-like tests:

- ``security=BrokerSecurity(...)``: every listener is ``SASL_SSL`` (a PKCS#12 keystore the
  caller provides). The broker's own user (``framecast-broker``, a super user) logs in with
  PLAIN, checked against the broker's 0600 config file, on the controller listener
  (127.0.0.1, KRaft controller APIs only) and between brokers; client users log in with
  SCRAM, their credentials upserted through the Admin API once the broker answers (never on
  a command line). With ``authorizer=True`` a ``StandardAuthorizer`` denies whatever the
  ``acls`` grants do not allow.
- :class:`EmbeddedKafkaCluster`: several combined broker+controller nodes with a static
  KRaft quorum (``controller.quorum.voters``), replication factor = node count and
  ``min.insync.replicas`` below it, so that one node can die without losing an
  acknowledged record.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from cluster.exceptions import BrokerStartError, PortInUseError, PrerequisiteError
from cluster.processes import (
    free_port,
    log_tail,
    port_answers,
    port_is_free,
    process_alive,
    read_json,
    read_state,
    terminate,
    write_json,
)

log = logging.getLogger(__name__)

POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
BROKER_JAR_GLOB = "kafka_2.13-*.jar"

_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


ScramMechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-512"]
SCRAM_MECHANISMS: tuple[ScramMechanism, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-512")
SCRAM_ITERATIONS = 8192  # >= Kafka's minimum of 4096 for both mechanisms
INTER_BROKER_USER = "framecast-broker"
INTER_BROKER_MECHANISM = "PLAIN"  # SCRAM needs the metadata log, which the controller serves
STANDARD_AUTHORIZER = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
# SCRAM user names: no ',' or '=' (the SCRAM saslname escapes), no spaces or quotes.
_USER_NAME = re.compile(r"^[A-Za-z0-9._~!@#$%^&*()+:;?/|{}-]{1,256}$")
AclResource = Literal["TOPIC", "GROUP", "TRANSACTIONAL_ID", "CLUSTER"]
AclOperationName = Literal[
    "ALL",
    "READ",
    "WRITE",
    "CREATE",
    "DELETE",
    "ALTER",
    "DESCRIBE",
    "DESCRIBE_CONFIGS",
    "ALTER_CONFIGS",
    "IDEMPOTENT_WRITE",
]


class AclGrant(BaseModel):
    """One ALLOW rule: ``user`` may do ``operations`` on a resource (or a name prefix)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(description="SCRAM user name the rule is for (principal User:<user>).")
    resource: AclResource = Field(description="Kind of resource.")
    name: str = Field(
        min_length=1, description="Resource name, or prefix; kafka-cluster for CLUSTER."
    )
    prefixed: bool = Field(default=False, description="Match every name starting with name.")
    operations: tuple[AclOperationName, ...] = Field(
        default=("ALL",), min_length=1, description="Operations allowed."
    )

    def bindings(self) -> list[Any]:
        """The rule as confluent-kafka ``AclBinding`` objects (one per operation)."""
        from confluent_kafka.admin import (
            AclBinding,
            AclOperation,
            AclPermissionType,
            ResourcePatternType,
            ResourceType,
        )

        pattern = ResourcePatternType.PREFIXED if self.prefixed else ResourcePatternType.LITERAL
        return [
            AclBinding(
                ResourceType[self.resource],
                self.name,
                pattern,
                f"User:{self.user}",
                "*",
                AclOperation[operation],
                AclPermissionType.ALLOW,
            )
            for operation in self.operations
        ]


class BrokerSecurity(BaseModel):
    """TLS, SASL users and ACLs of the embedded broker (every listener ``SASL_SSL``).

    ``keystore`` is a PKCS#12 file with the broker's private key and certificate (its SANs
    must cover 127.0.0.1, which clients verify); ``ca_file`` is the PEM CA that signed it,
    which the broker trusts for its own connections. ``scram_users`` get both SCRAM
    mechanisms, upserted at every start (a changed password takes effect then). With
    ``authorizer`` a ``StandardAuthorizer`` runs: the broker's own user is the only super
    user, and every other user may do exactly what ``acls`` grant (ALLOW rules of the users
    in ``scram_users`` that ``acls`` no longer lists are removed at start). Secrets are
    ``SecretStr``: they never appear in reprs or logs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keystore: Path = Field(description="PKCS#12 keystore: the broker's key and certificate.")
    keystore_password: SecretStr = Field(description="Password of the keystore and its key.")
    ca_file: Path = Field(description="PEM CA certificate that signed the broker certificate.")
    scram_users: dict[str, SecretStr] = Field(
        default_factory=dict, description="SCRAM users (name -> password), upserted at start."
    )
    authorizer: bool = Field(
        default=False, description="Run a StandardAuthorizer: deny what acls do not grant."
    )
    acls: tuple[AclGrant, ...] = Field(default=(), description="ALLOW rules, with authorizer.")

    @field_validator("keystore", "ca_file")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not Path(path).is_file():
            raise ValueError(f"no such file: {path}")
        return Path(path).resolve()

    @field_validator("scram_users")
    @classmethod
    def _safe_users(cls, users: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, password in users.items():
            if not _USER_NAME.match(name) or name == INTER_BROKER_USER:
                raise ValueError(
                    f"SCRAM user name {name!r} must be 1-256 of letters, digits and "
                    f"._~!@#$%^&*()+:;?/|{{}}- and not {INTER_BROKER_USER!r}"
                )
            if not password.get_secret_value():
                raise ValueError(f"the SCRAM password of {name!r} is empty")
        return users

    @model_validator(mode="after")
    def _acls_need_the_authorizer(self) -> BrokerSecurity:
        if self.acls and not self.authorizer:
            raise ValueError("acls: ACLs are only enforced with authorizer=True")
        return self


@dataclass
class BrokerInfo:
    """What a running embedded broker looks like from outside."""

    pid: int
    create_time: float
    port: int
    controller_port: int
    bootstrap_servers: str
    data_dir: str
    log_file: str
    started_at: float
    security_protocol: str = "PLAINTEXT"
    node_id: int = 1


def resolve_jars(libs_dir: Path, pom: Path = POM) -> Path:
    """Resolve the broker jars with Maven into libs_dir, once; returns libs_dir."""
    if any(libs_dir.glob(BROKER_JAR_GLOB)):
        return libs_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise PrerequisiteError(
            "Maven (mvn) is needed once to fetch the Kafka broker jars from Maven Central; "
            "install it (Debian: apt-get install maven) or set FRAMECAST_KAFKA_LIBS to a "
            "directory that already holds them"
        )
    _require_java()
    libs_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs_dir.resolve()}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not any(libs_dir.glob(BROKER_JAR_GLOB)):
        raise PrerequisiteError(
            f"Maven could not resolve the Kafka jars (exit {result.returncode}):\n"
            + (result.stdout + result.stderr)[-3000:]
        )
    return libs_dir


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise PrerequisiteError("a JDK 17+ (java) is needed to run the embedded Kafka broker")
    return java


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID, base64url without padding, as kafka-storage makes."""
    # Like Kafka's own Uuid.randomUuid(), never starting with "-": kafka-storage's argument
    # parser would read such an id as an option ("--cluster-id: expected one argument"),
    # 1 time in 64.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class EmbeddedKafka:
    """One KRaft broker (and controller) whose state lives under ``home/kafka``.

    Alone by default (a standalone quorum); a node of an :class:`EmbeddedKafkaCluster` when
    ``voters`` (node id -> controller port of every node) is given.
    """

    def __init__(
        self,
        home: Path,
        libs_dir: Path | None = None,
        port: int = 9092,
        heap_mb: int = 512,
        extra_properties: dict[str, str] | None = None,
        *,
        security: BrokerSecurity | None = None,
        node_id: int = 1,
        voters: dict[int, int] | None = None,
        cluster_id: str | None = None,
        min_insync_replicas: int = 1,
    ) -> None:
        if voters is not None and node_id not in voters:
            raise ValueError(f"node_id {node_id} is not one of the voters {sorted(voters)}")
        replicas = len(voters) if voters else 1
        if not 1 <= min_insync_replicas <= replicas:
            raise ValueError(
                f"min_insync_replicas must be in 1..{replicas} (the node count), "
                f"got {min_insync_replicas}"
            )
        self.dir = Path(home) / "kafka"
        self.libs_dir = libs_dir or self.dir / "libs"
        self.port = port
        self.heap_mb = heap_mb
        self.extra_properties = dict(extra_properties or {})
        self.security = security
        self.node_id = node_id
        self.voters = dict(voters) if voters else None
        self.cluster_id = cluster_id
        self.replication_factor = replicas
        self.min_insync_replicas = min_insync_replicas
        self.secret_file = self.dir / "inter-broker.secret"
        self.data_dir = self.dir / "data"
        self.config_file = self.dir / "server.properties"
        self.log4j_file = self.dir / "log4j2.properties"
        self.log_file = self.dir / "broker.log"
        self.state_file = self.dir / "broker.json"
        self.ports_file = self.dir / "ports.json"

    # -- inspection -------------------------------------------------------------------
    def info(self) -> BrokerInfo | None:
        """The running broker's info, or None when it is not running."""
        info = read_state(self.state_file, BrokerInfo)
        if info is None:
            return None
        # Its config file names this broker alone (a pid reused by another process does not).
        marker = str(self.config_file.resolve())
        return info if process_alive(info.pid, info.create_time, marker) else None

    @property
    def bootstrap_servers(self) -> str:
        """host:port clients use to reach this broker."""
        return f"127.0.0.1:{self.port}"

    @property
    def security_protocol(self) -> str:
        """Protocol of the listeners: PLAINTEXT, or SASL_SSL with ``security``."""
        return "SASL_SSL" if self.security else "PLAINTEXT"

    def rdkafka_config(self) -> dict[str, Any]:
        """librdkafka properties of the broker's own (super) user: readiness checks, its
        users and ACLs. Holds the inter-broker password: never log it."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.security is not None:
            config.update(
                {
                    "security.protocol": "sasl_ssl",
                    "sasl.mechanism": INTER_BROKER_MECHANISM,
                    "sasl.username": INTER_BROKER_USER,
                    "sasl.password": self._inter_broker_password(),
                    "ssl.ca.location": str(self.security.ca_file),
                    "ssl.endpoint.identification.algorithm": "https",
                }
            )
        return config

    # -- life cycle -----------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> BrokerInfo:
        """Start the broker (idempotent) and wait until it answers metadata requests."""
        running = self.info()
        if running is not None:
            self.port = running.port
            return running
        info, proc = self.launch()
        deadline = time.monotonic() + timeout
        self._wait_ready(proc, timeout)
        if self.security is not None:
            try:
                self._apply_security(self.security, max(10.0, deadline - time.monotonic()))
            except BrokerStartError:
                self.stop()  # never leave a broker whose users or ACLs are not what was asked
                raise
        # A broker that just (re)started loads its transaction coordinator before it hands
        # out producer ids (a second or so: docs/BENCHMARKS.md), during which every
        # idempotent producer (frames, labels) holds its records. Ready means ready for
        # them too.
        if not producer_ids_available(
            self.rdkafka_config(), min(30.0, max(1.0, deadline - time.monotonic()))
        ):
            log.warning("the broker at %s hands out no producer ids yet", self.bootstrap_servers)
        return info

    def launch(self) -> tuple[BrokerInfo, subprocess.Popen[bytes]]:
        """Write the config, format once and spawn the broker; does not wait for it.

        A node of a cluster cannot answer before a quorum of controllers runs, so a cluster
        launches every node first and then waits for each (:meth:`wait_ready`).
        """
        java = _require_java()
        resolve_jars(self.libs_dir)
        controller_port = self._controller_port()
        for name, port in (("kafka port", self.port), ("controller port", controller_port)):
            if not port_is_free(port):
                raise PortInUseError(
                    f"{name} {port} on 127.0.0.1 is already in use by another process; "
                    "choose another with --kafka-port (or stop what holds it)"
                )
        self._write_config(controller_port)
        if not (self.data_dir / "meta.properties").exists():
            self._format(java)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log_handle:
            proc = subprocess.Popen(
                [
                    java,
                    f"-Xmx{self.heap_mb}m",
                    f"-Xms{min(self.heap_mb, 256)}m",
                    "-XX:+UseG1GC",
                    "-XX:MaxGCPauseMillis=20",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={self.log4j_file.resolve()}",
                    "-cp",
                    f"{self.libs_dir.resolve()}/*",
                    "kafka.Kafka",
                    str(self.config_file.resolve()),
                ],
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the CLI that started it
            )
        info = BrokerInfo(
            pid=proc.pid,
            create_time=psutil.Process(proc.pid).create_time(),
            port=self.port,
            controller_port=controller_port,
            bootstrap_servers=self.bootstrap_servers,
            data_dir=str(self.data_dir.resolve()),
            log_file=str(self.log_file.resolve()),
            started_at=time.time(),
            security_protocol=self.security_protocol,
            node_id=self.node_id,
        )
        write_json(self.state_file, asdict(info))
        return info, proc

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
        """Wait until the launched broker answers metadata requests (BrokerStartError if not)."""
        self._wait_ready(proc, timeout)

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the broker cleanly (SIGTERM, wait, then SIGKILL); False if it was not running."""
        info = self.info()
        self.state_file.unlink(missing_ok=True)
        if info is None:
            return False
        try:
            proc = psutil.Process(info.pid)
        except psutil.NoSuchProcess:
            return False
        killed = terminate([proc], timeout)
        if killed:
            log.warning(
                "Kafka broker pid %s did not stop within %ss and was killed", info.pid, timeout
            )
        return True

    # -- internals --------------------------------------------------------------------
    def _controller_port(self) -> int:
        if self.voters is not None:
            return self.voters[self.node_id]
        ports = read_json(self.ports_file)
        if ports and isinstance(ports.get("controller_port"), int):
            return int(ports["controller_port"])
        port = free_port()
        write_json(self.ports_file, {"controller_port": port})
        return port

    def _properties(self, controller_port: int) -> dict[str, str]:
        listener = self.security_protocol
        endpoints = f"{listener}://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller_port}"
        rf, isr = str(self.replication_factor), str(self.min_insync_replicas)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "listeners": endpoints,
            "advertised.listeners": endpoints,
            "inter.broker.listener.name": listener,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{listener}:{listener}",
            "log.dirs": str(self.data_dir.resolve()),
            "num.partitions": "1",
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            # A dev broker: rebalance immediately rather than after 3 s.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(16 * 1024 * 1024),
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if self.voters is None:
            props["controller.quorum.bootstrap.servers"] = f"127.0.0.1:{controller_port}"
        else:
            props["controller.quorum.voters"] = ",".join(
                f"{node}@127.0.0.1:{port}" for node, port in sorted(self.voters.items())
            )
        if self.security is not None:
            props.update(self._security_properties(self.security))
        props.update(self.extra_properties)
        return props

    def _security_properties(self, security: BrokerSecurity) -> dict[str, str]:
        password = self._inter_broker_password()
        # PLAIN, checked against this file: the broker's own user, on the controller listener
        # (KRaft cannot use SCRAM there) and between brokers. The same entry is what this
        # broker presents when it connects to a controller or another broker.
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{INTER_BROKER_USER}" password="{password}" '
            f'user_{INTER_BROKER_USER}="{password}";'
        )
        # Every mechanism a listener enables needs a JAAS entry; SCRAM's is never used to
        # log in (brokers use PLAIN) but must be there.
        scram = {
            f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{INTER_BROKER_USER}" password="{password}";'
            )
            for mechanism in SCRAM_MECHANISMS
        }
        props = {
            "listener.security.protocol.map": "CONTROLLER:SASL_SSL,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": ",".join((*SCRAM_MECHANISMS, INTER_BROKER_MECHANISM)),
            "sasl.mechanism.inter.broker.protocol": INTER_BROKER_MECHANISM,
            "sasl.mechanism.controller.protocol": INTER_BROKER_MECHANISM,
            "listener.name.controller.sasl.enabled.mechanisms": INTER_BROKER_MECHANISM,
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "listener.name.sasl_ssl.plain.sasl.jaas.config": plain,
            **scram,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(security.keystore),
            "ssl.keystore.password": security.keystore_password.get_secret_value(),
            "ssl.key.password": security.keystore_password.get_secret_value(),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(security.ca_file),
            "ssl.client.auth": "none",
            "ssl.endpoint.identification.algorithm": "https",
        }
        if security.authorizer:
            props["authorizer.class.name"] = STANDARD_AUTHORIZER
            props["super.users"] = f"User:{INTER_BROKER_USER}"
            props["allow.everyone.if.no.acl.found"] = "false"
        return props

    def _apply_security(self, security: BrokerSecurity, timeout: float) -> None:
        """Upsert the SCRAM users and the ACLs, then wait until every user can log in."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import (
            AclBindingFilter,
            AclOperation,
            AclPermissionType,
            AdminClient,
            ResourcePatternType,
            ResourceType,
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialAlteration,
            UserScramCredentialUpsertion,
        )

        admin_config: dict[str, Any] = {
            **self.rdkafka_config(),
            "logger": logging.getLogger(f"{__name__}.admin"),
        }
        admin = AdminClient(admin_config)
        wait = max(5.0, timeout / 2)
        try:
            # One request per mechanism: Kafka refuses a user twice in one request.
            for mechanism in SCRAM_MECHANISMS:
                upserts: list[UserScramCredentialAlteration] = [
                    UserScramCredentialUpsertion(
                        name,
                        ScramCredentialInfo(
                            ScramMechanism[mechanism.replace("-", "_")], SCRAM_ITERATIONS
                        ),
                        password.get_secret_value().encode(),
                    )
                    for name, password in security.scram_users.items()
                ]
                if upserts:
                    for future in admin.alter_user_scram_credentials(
                        upserts, request_timeout=wait
                    ).values():
                        future.result()
            if security.authorizer:
                wanted = {binding for grant in security.acls for binding in grant.bindings()}
                stale = []
                for name in security.scram_users:
                    anything = AclBindingFilter(
                        ResourceType.ANY,
                        None,  # type: ignore[arg-type]  # None matches any name
                        ResourcePatternType.ANY,
                        f"User:{name}",
                        None,  # type: ignore[arg-type]  # and any host
                        AclOperation.ANY,
                        AclPermissionType.ANY,
                    )
                    held = admin.describe_acls(anything, request_timeout=wait).result()
                    stale += [binding for binding in held if binding not in wanted]
                if stale:
                    for future in admin.delete_acls(stale, request_timeout=wait).values():
                        future.result()
                if wanted:
                    for future in admin.create_acls(
                        sorted(wanted), request_timeout=wait
                    ).values():
                        future.result()
        except KafkaException as error:
            raise BrokerStartError(
                f"the Kafka broker at {self.bootstrap_servers} refused its users or ACLs: "
                f"{error.args[0].str() if error.args else error}"
            ) from None
        deadline = time.monotonic() + timeout
        for name, password in security.scram_users.items():
            while not _can_log_in(self, name, password.get_secret_value()):
                if time.monotonic() > deadline:
                    raise BrokerStartError(
                        f"the SCRAM user {name!r} still cannot log in to the Kafka broker at "
                        f"{self.bootstrap_servers} after {timeout:.0f}s"
                    )
                time.sleep(0.2)

    def _inter_broker_password(self) -> str:
        """The broker's own SCRAM password: made once, kept in a 0600 file under the home."""
        if self.secret_file.is_file():
            return self.secret_file.read_text(encoding="utf-8").strip()
        self.dir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24).replace("-", "_")
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(password + "\n")
        return password

    def _write_config(self, controller_port: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{key}={value}" for key, value in self._properties(controller_port).items()]
        # The config may hold passwords (keystore, inter-broker SCRAM): owner-only.
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(
                "# generated by framecast; edits are overwritten\n" + "\n".join(lines) + "\n"
            )
        os.chmod(self.config_file, 0o600)
        self.log4j_file.write_text(_LOG4J2)

    def _format(self, java: str) -> None:
        cluster_id = self.cluster_id or new_cluster_id()
        quorum = ["--standalone"] if self.voters is None else []
        cmd = [
            java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={self.log4j_file.resolve()}",
            "-cp",
            f"{self.libs_dir.resolve()}/*",
            "kafka.tools.StorageTool",
            "format",
            *quorum,
            "-t",
            cluster_id,
            "-c",
            str(self.config_file.resolve()),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-3000:]
            for secret in self._secrets():
                output = output.replace(secret, "**********")
            raise BrokerStartError(
                f"formatting the Kafka storage in {self.data_dir} failed "
                f"(exit {result.returncode}):\n{output}"
            )

    def _secrets(self) -> list[str]:
        if self.security is None:
            return []
        return [
            self._inter_broker_password(),
            self.security.keystore_password.get_secret_value(),
            *(p.get_secret_value() for p in self.security.scram_users.values()),
        ]

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.state_file.unlink(missing_ok=True)
                raise BrokerStartError(
                    f"the Kafka broker exited with code {proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
                )
            if port_answers(self.port) and broker_answers_metadata(self.rdkafka_config()):
                return
            time.sleep(0.5)
        terminate([psutil.Process(proc.pid)], 10)
        self.state_file.unlink(missing_ok=True)
        raise BrokerStartError(
            f"the Kafka broker did not answer on {self.bootstrap_servers} within {timeout:.0f}s; "
            f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
        )

    def wipe(self) -> None:
        """Delete the broker's data (it must be stopped)."""
        if self.info() is not None:
            raise BrokerStartError("refusing to wipe the data of a running broker")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.ports_file.unlink(missing_ok=True)
        self.secret_file.unlink(missing_ok=True)


class EmbeddedKafkaCluster:
    """``nodes`` combined broker+controller nodes on 127.0.0.1: a real replicated cluster.

    Topics default to replication factor ``nodes`` and ``min.insync.replicas`` (default
    ``nodes - 1``), so with acks=all one node can die without losing an acknowledged
    record and without stopping writes. Ports and the cluster id are chosen once and kept
    in ``home/cluster.json``, so a node restarts where it was.
    """

    def __init__(
        self,
        home: Path,
        libs_dir: Path,
        nodes: int = 3,
        heap_mb: int = 256,
        min_insync_replicas: int | None = None,
        extra_properties: dict[str, str] | None = None,
    ) -> None:
        if nodes < 2:
            raise ValueError(f"a cluster needs at least 2 nodes, got {nodes}")
        self.home = Path(home)
        self.state_file = self.home / "cluster.json"
        state = read_json(self.state_file)
        if state is None or len(state.get("ports", {})) != nodes:
            state = {
                "cluster_id": new_cluster_id(),
                "ports": {str(n): free_port() for n in range(1, nodes + 1)},
                "controller_ports": {str(n): free_port() for n in range(1, nodes + 1)},
            }
            write_json(self.state_file, state)
        voters = {int(n): int(p) for n, p in state["controller_ports"].items()}
        isr = min_insync_replicas if min_insync_replicas is not None else nodes - 1
        self.nodes = [
            EmbeddedKafka(
                self.home / f"node-{node}",
                libs_dir=libs_dir,
                port=int(state["ports"][str(node)]),
                heap_mb=heap_mb,
                extra_properties=extra_properties,
                node_id=node,
                voters=voters,
                cluster_id=str(state["cluster_id"]),
                min_insync_replicas=isr,
            )
            for node in sorted(voters)
        ]

    @property
    def bootstrap_servers(self) -> str:
        """Every node's client endpoint, comma-separated."""
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def node(self, node_id: int) -> EmbeddedKafka:
        """The node with this id (1-based)."""
        return self.nodes[node_id - 1]

    def start(self, timeout: float = 180.0) -> list[BrokerInfo]:
        """Launch every node that is not running, then wait for each to answer."""
        from concurrent.futures import ThreadPoolExecutor

        stopped = [node for node in self.nodes if node.info() is None]
        with ThreadPoolExecutor(max_workers=max(1, len(stopped))) as pool:  # format in parallel
            procs = list(pool.map(lambda node: node.launch()[1], stopped))
        launched = list(zip(stopped, procs, strict=True))
        deadline = time.monotonic() + timeout
        for node, proc in launched:
            node.wait_ready(proc, max(10.0, deadline - time.monotonic()))
        return [info for info in (node.info() for node in self.nodes) if info is not None]

    def under_replicated(self) -> list[str]:
        """``topic[partition]`` of every partition whose in-sync replicas are fewer than its
        replicas (internal topics included); ``["unreachable"]`` when no node answers."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "logger": _quiet("metadata"),
        }
        admin = AdminClient(config)
        try:
            topics = admin.list_topics(timeout=5).topics
        except KafkaException:
            return ["unreachable"]
        return [
            f"{name}[{partition.id}]"
            for name, topic in sorted(topics.items())
            for partition in sorted(topic.partitions.values(), key=lambda p: p.id)
            if len(partition.isrs) < len(partition.replicas)
        ]

    def wait_in_sync(self, timeout: float = 120.0) -> None:
        """Wait until every partition is fully replicated again (after a node restarts).

        Until then a further node loss can leave a partition below ``min.insync.replicas``,
        where Kafka rightly refuses writes (acks=all) instead of risking a loss.
        """
        deadline = time.monotonic() + timeout
        lagging = self.under_replicated()
        while lagging:
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"the Kafka cluster is not fully in sync after {timeout:.0f}s: "
                    f"{', '.join(lagging[:10])}"
                )
            time.sleep(1)
            lagging = self.under_replicated()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every node at once (SIGTERM, then SIGKILL after timeout).

        All together: one by one, the last nodes would wait for a quorum that is gone.
        """
        procs = []
        for node in self.nodes:
            info = node.info()
            node.state_file.unlink(missing_ok=True)
            if info is not None:
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(info.pid))
        killed = terminate(procs, timeout)
        if killed:
            log.warning("Kafka cluster nodes %s did not stop within %ss: killed", killed, timeout)


def _quiet(purpose: str) -> logging.Logger:
    """A logger that drops librdkafka's lines while we poll a broker that may not answer
    yet: its refusals and retries until then are expected."""
    logger = logging.getLogger(f"{__name__}.{purpose}")
    logger.setLevel(logging.CRITICAL)
    return logger


def broker_answers_metadata(config: dict[str, Any], timeout_s: float = 5.0) -> bool:
    """True when a Kafka metadata request succeeds within ``timeout_s``, for a client of
    these librdkafka properties (``bootstrap.servers`` and the security settings)."""
    from confluent_kafka import KafkaException  # imported lazily: the CLI starts faster
    from confluent_kafka.admin import AdminClient

    probe: dict[str, Any] = {**config, "logger": _quiet("ready")}
    admin = AdminClient(probe)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException:  # unreachable, not ready yet, or refusing these credentials
        return False
    return True


def _can_log_in(broker: EmbeddedKafka, user: str, password: str) -> bool:
    """True when ``user`` logs in to the broker with SCRAM-SHA-512 and gets metadata."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    config: dict[str, Any] = {
        **broker.rdkafka_config(),
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": user,
        "sasl.password": password,
        "logger": _quiet("login"),  # refusals until the credentials are known
    }
    try:
        AdminClient(config).list_topics(timeout=5)
    except KafkaException:
        return False
    return True


def producer_ids_available(config: dict[str, Any], timeout_s: float) -> bool:
    """True once an idempotent producer of these librdkafka properties gets its producer id
    (within ``timeout_s``)."""
    from confluent_kafka import Producer

    state: dict[str, Any] = {}

    def on_stats(raw: str) -> None:
        state["idempotence"] = json.loads(raw).get("eos", {}).get("idemp_state")

    producer = Producer(
        {
            **config,
            "enable.idempotence": True,
            "statistics.interval.ms": 100,
            "stats_cb": on_stats,
            "logger": _quiet("probe"),  # its retries while the broker loads
        }
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        producer.poll(0.1)
        if state.get("idempotence") == "Assigned":
            return True
    return False


if __name__ == "__main__":  # pragma: no cover - manual debugging aid
    broker = EmbeddedKafka(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".framecast"))
    print(broker.start())
