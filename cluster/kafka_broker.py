"""The embedded Apache Kafka broker: a real single-node KRaft broker run from Maven jars.

Life cycle: ``resolve_jars`` (Maven, cached) -> ``format`` the storage once
(``kafka.tools.StorageTool format --standalone``) -> ``start`` ``kafka.Kafka`` as a detached
process -> wait until it answers metadata requests -> ``stop`` (SIGTERM, then wait).
The data directory survives restarts, and so does the controller port, because a
standalone KRaft quorum records its voter endpoint at format time.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

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
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


class EmbeddedKafka:
    """One single-node KRaft broker whose state lives under ``home/kafka``."""

    def __init__(
        self,
        home: Path,
        libs_dir: Path | None = None,
        port: int = 9092,
        heap_mb: int = 512,
        extra_properties: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(home) / "kafka"
        self.libs_dir = libs_dir or self.dir / "libs"
        self.port = port
        self.heap_mb = heap_mb
        self.extra_properties = dict(extra_properties or {})
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

    # -- life cycle -----------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> BrokerInfo:
        """Start the broker (idempotent) and wait until it answers metadata requests."""
        running = self.info()
        if running is not None:
            self.port = running.port
            return running
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
        )
        write_json(self.state_file, asdict(info))
        self._wait_ready(proc, timeout)
        return info

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
        ports = read_json(self.ports_file)
        if ports and isinstance(ports.get("controller_port"), int):
            return int(ports["controller_port"])
        port = free_port()
        write_json(self.ports_file, {"controller_port": port})
        return port

    def _properties(self, controller_port: int) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller_port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir.resolve()),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A single-node dev broker: rebalance immediately rather than after 3 s.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(16 * 1024 * 1024),
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        props.update(self.extra_properties)
        return props

    def _write_config(self, controller_port: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{key}={value}" for key, value in self._properties(controller_port).items()]
        self.config_file.write_text(
            "# generated by framecast; edits are overwritten\n" + "\n".join(lines) + "\n"
        )
        self.log4j_file.write_text(_LOG4J2)

    def _format(self, java: str) -> None:
        cluster_id = new_cluster_id()
        cmd = [
            java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={self.log4j_file.resolve()}",
            "-cp",
            f"{self.libs_dir.resolve()}/*",
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            cluster_id,
            "-c",
            str(self.config_file.resolve()),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerStartError(
                f"formatting the Kafka storage in {self.data_dir} failed "
                f"(exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}"
            )

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.state_file.unlink(missing_ok=True)
                raise BrokerStartError(
                    f"the Kafka broker exited with code {proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{log_tail(self.log_file)}"
                )
            if port_answers(self.port) and broker_answers_metadata(self.bootstrap_servers):
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


if __name__ == "__main__":  # pragma: no cover - manual debugging aid
    broker = EmbeddedKafka(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".framecast"))
    print(broker.start())
