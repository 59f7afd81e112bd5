"""The embedded Apache Kafka broker: a real KRaft broker run from Maven jars.

Life cycle: ``resolve_jars`` (Maven, cached) -> ``format`` the storage once
(``kafka.tools.StorageTool format --standalone``) -> ``start`` ``kafka.Kafka`` as a detached
process -> wait until it answers metadata requests -> ``stop`` (SIGTERM, then wait).
The data directory survives restarts, and so does the controller port, because a
standalone KRaft quorum records its voter endpoint at format time.

Two variants for production-like tests:

- ``security=BrokerSecurity(...)``: the client listener (also used between brokers) is
  ``SASL_SSL`` with SCRAM users created at format time and a PKCS#12 keystore the caller
  provides; the controller listener stays on 127.0.0.1 and serves only KRaft controller APIs.
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
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from cluster.exceptions import BrokerStartError, PortInUseError, PrerequisiteError
from cluster.processes import (
    free_port,
    log_tail,
    port_answers,
    port_is_free,
    process_alive,
    read_json,
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
INTER_BROKER_USER = "framecast-broker"
# The StorageTool parses `--add-scram 'MECH=[name=N,password=P]'`: keep N and P to safe chars.
_SCRAM_SAFE = re.compile(r"^[A-Za-z0-9._~!@#$%^&*()+:;?/|{}-]{1,256}$")


class BrokerSecurity(BaseModel):
    """TLS and SCRAM for the embedded broker's client listener (``SASL_SSL``).

    ``keystore`` is a PKCS#12 file with the broker's private key and certificate (its SANs
    must cover 127.0.0.1, which clients verify); ``ca_file`` is the PEM CA that signed it,
    which the broker trusts for its own inter-broker connections. ``scram_users`` are
    created at format time (both SCRAM mechanisms), so changing them needs a fresh data
    directory. Secrets are ``SecretStr``: they never appear in reprs or logs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keystore: Path = Field(description="PKCS#12 keystore: the broker's key and certificate.")
    keystore_password: SecretStr = Field(description="Password of the keystore and its key.")
    ca_file: Path = Field(description="PEM CA certificate that signed the broker certificate.")
    scram_users: dict[str, SecretStr] = Field(
        default_factory=dict, description="SCRAM users (name -> password) made at format time."
    )
    inter_broker_mechanism: ScramMechanism = Field(
        default="SCRAM-SHA-512", description="SCRAM mechanism brokers use among themselves."
    )

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
            if not _SCRAM_SAFE.match(name) or name == INTER_BROKER_USER:
                raise ValueError(
                    f"SCRAM user name {name!r} must be 1-256 of letters, digits and "
                    f"._~!@#$%^&*()+:;?/|{{}}- and not {INTER_BROKER_USER!r}"
                )
            if not _SCRAM_SAFE.match(password.get_secret_value()):
                raise ValueError(
                    f"the SCRAM password of {name!r} must be 1-256 of letters, digits and "
                    "._~!@#$%^&*()+:;?/|{}- (no spaces, commas, quotes, '=' or brackets)"
                )
        return users


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
        state = read_json(self.state_file)
        if state is None:
            return None
        try:
            info = BrokerInfo(**state)
        except TypeError:
            return None
        return info if process_alive(info.pid, info.create_time) else None

    @property
    def bootstrap_servers(self) -> str:
        """host:port clients use to reach this broker."""
        return f"127.0.0.1:{self.port}"

    @property
    def security_protocol(self) -> str:
        """Protocol of the client listener: PLAINTEXT, or SASL_SSL with ``security``."""
        return "SASL_SSL" if self.security else "PLAINTEXT"

    def client_config(self) -> dict[str, Any]:
        """kafka-python settings of the broker's own user (readiness checks, inter-broker).

        Empty for a PLAINTEXT broker. Holds the inter-broker password: never log it.
        """
        if self.security is None:
            return {}
        return {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": self.security.inter_broker_mechanism,
            "sasl_plain_username": INTER_BROKER_USER,
            "sasl_plain_password": self._inter_broker_password(),
            "ssl_cafile": str(self.security.ca_file),
        }

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
        # A broker that just (re)started loads its transaction coordinator before it hands
        # out producer ids: ~1 s here, during which every idempotent producer (frames,
        # labels) holds its records. Ready means ready for them too.
        if not producer_ids_available(
            self.bootstrap_servers, min(30.0, max(1.0, deadline - time.monotonic())),
            **self.client_config(),
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
        # Every enabled mechanism needs a JAAS entry on the listener; the credentials in it
        # are what this broker presents when it connects to the others.
        jaas = {
            f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{INTER_BROKER_USER}" password="{password}";'
            )
            for mechanism in SCRAM_MECHANISMS
        }
        return {
            "sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
            "sasl.mechanism.inter.broker.protocol": security.inter_broker_mechanism,
            **jaas,
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(security.keystore),
            "ssl.keystore.password": security.keystore_password.get_secret_value(),
            "ssl.key.password": security.keystore_password.get_secret_value(),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(security.ca_file),
            "ssl.client.auth": "none",
            "ssl.endpoint.identification.algorithm": "https",
        }

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

    def _scram_arguments(self) -> list[str]:
        if self.security is None:
            return []
        users = {INTER_BROKER_USER: self._inter_broker_password()}
        users.update({n: p.get_secret_value() for n, p in self.security.scram_users.items()})
        args = []
        for name, password in users.items():
            for mechanism in SCRAM_MECHANISMS:
                args += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        return args

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
            *self._scram_arguments(),
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
            if port_answers(self.port) and broker_answers_metadata(
                self.bootstrap_servers, **self.client_config()
            ):
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
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers.split(","), request_timeout_ms=5000
            )
        except (KafkaError, OSError):
            return ["unreachable"]
        try:
            lagging = []
            for topic in admin.describe_topics():
                for partition in topic["partitions"]:
                    if len(partition["isr_nodes"]) < len(partition["replica_nodes"]):
                        lagging.append(f"{topic['name']}[{partition['partition_index']}]")
            return lagging
        except (KafkaError, OSError):
            return ["unreachable"]
        finally:
            with contextlib.suppress(KafkaError, OSError):
                admin.close()

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


def broker_answers_metadata(
    bootstrap_servers: str, timeout_ms: int = 5000, **client_config: Any
) -> bool:
    """True when a Kafka metadata request to bootstrap_servers succeeds."""
    from kafka import KafkaAdminClient  # imported lazily: the CLI starts faster
    from kafka.errors import KafkaError

    # kafka-python logs every failed connection attempt; while we poll, that is noise.
    kafka_logger = logging.getLogger("kafka")
    previous = kafka_logger.level
    kafka_logger.setLevel(logging.CRITICAL)
    admin = None
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers.split(","),
            request_timeout_ms=timeout_ms,
            **client_config,
        )
        admin.describe_cluster()
        return True
    except (KafkaError, OSError):  # unreachable or not ready yet
        return False
    finally:
        if admin is not None:
            with contextlib.suppress(KafkaError, OSError):
                admin.close()
        kafka_logger.setLevel(previous)


def producer_ids_available(bootstrap_servers: str, timeout_s: float, **client_config: Any) -> bool:
    """True once an idempotent producer gets its producer id (within ``timeout_s``)."""
    from confluent_kafka import Producer

    from streams.config import rdkafka_properties

    state: dict[str, Any] = {}

    def on_stats(raw: str) -> None:
        state["idempotence"] = json.loads(raw).get("eos", {}).get("idemp_state")

    quiet = logging.getLogger(f"{__name__}.probe")  # its retries while the broker loads
    quiet.setLevel(logging.CRITICAL)
    producer = Producer(
        {
            **rdkafka_properties({"bootstrap_servers": bootstrap_servers, **client_config}),
            "enable.idempotence": True,
            "statistics.interval.ms": 100,
            "stats_cb": on_stats,
            "logger": quiet,
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
