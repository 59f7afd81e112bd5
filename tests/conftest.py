"""Session-scoped real infrastructure: one Apache Kafka broker and one local Ray head.

Both are started from the project's own code (the same code `framecast up` runs), on free
ports, under a temporary home, and stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.kafka_broker import EmbeddedKafka, resolve_jars
from cluster.processes import free_port
from cluster.ray_head import LocalRayHead, RayHeadInfo, use_ray_auth_env
from cluster.ray_nodes import (
    LocalRayCluster,
    WorkerNodeInfo,
    head_node_id,
    recorded_workers,
)
from cluster.settings import RaySettings
from streams.config import KafkaSettings

REPO = Path(__file__).resolve().parents[1]
FRAMECAST = Path(sys.executable).parent / "framecast"


@pytest.fixture(scope="session")
def kafka_libs() -> Path:
    """The broker jars, resolved once by Maven into the repo's cache."""
    return resolve_jars(REPO / ".framecast" / "kafka" / "libs")


@pytest.fixture(scope="session")
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory, kafka_libs: Path
) -> Iterator[EmbeddedKafka]:
    """A real single-node KRaft broker for the whole test session."""
    broker = EmbeddedKafka(
        tmp_path_factory.mktemp("kafka-home"), libs_dir=kafka_libs, port=free_port(), heap_mb=384
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka_settings(kafka_broker: EmbeddedKafka) -> KafkaSettings:
    """Connection settings that point at the session broker."""
    return KafkaSettings(bootstrap_servers=kafka_broker.bootstrap_servers)


@contextlib.contextmanager
def local_ray_head(
    home: Path, num_cpus: int = 4, *, in_process: bool = True
) -> Iterator[tuple[RayHeadInfo, dict[str, str]]]:
    """A real local Ray head on free ports: (its info, the env its clients need).

    With ``in_process`` this process's own Ray clients are switched to the head's token;
    without, the caller hands the env to subprocesses only (a driver already connected to
    another head keeps its token).
    """
    head = LocalRayHead(
        home,
        RaySettings(
            gcs_port=free_port(),
            dashboard_port=free_port(),
            num_cpus=num_cpus,
            object_store_mb=256,
        ),
    )
    info = head.start()
    env = head.client_env()
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    if in_process:
        use_ray_auth_env(env)
    try:
        yield info, env
    finally:
        head.stop()
        if in_process:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
            use_ray_auth_env({k: v for k, v in saved.items() if v is not None})


class LocalCluster:
    """The session's 3-node local Ray cluster: ``head`` plus ``workers`` (worker nodes 1, 2).

    The API the node-fault tests rely on (keep it stable): ``head`` (RayHeadInfo), ``workers``
    (list of WorkerNodeInfo, running ones, in index order), ``kill_worker(i)`` (SIGKILL worker
    node i's raylet and every process of it - a crash, not a drain; i counts from 1, as in
    ``worker-<i>``), ``add_worker()`` (start a new worker node, joined to the head; returns its
    info), ``node_ids()`` (the Ray node ids of the running nodes, head first) and
    ``node_id(i)`` (node i's id; 0 is the head) and ``temp_dirs()`` (every node's temp dir).
    """

    def __init__(self, head: LocalRayHead, info: RayHeadInfo, worker_cpus: int) -> None:
        self._head = head
        self.head = info
        self.worker_cpus = worker_cpus
        self._cluster = LocalRayCluster(head)

    @property
    def workers(self) -> list[WorkerNodeInfo]:
        return self._cluster.workers()

    def kill_worker(self, index: int) -> list[int]:
        """SIGKILL every process of worker node ``index``; returns the pids killed."""
        return self._cluster.worker(index).kill()

    def add_worker(self) -> WorkerNodeInfo:
        """Start a fresh worker node under a new index and wait until it joined."""
        used = [w.index for w in recorded_workers(self._head)]
        index = max(used, default=0) + 1
        return self._cluster.worker(index).start(self.head.address, self.worker_cpus)

    def node_id(self, index: int) -> str | None:
        return head_node_id(self._head) if index == 0 else self._cluster.worker(index).node_id()

    def node_ids(self) -> list[str]:
        ids = [head_node_id(self._head)] + [self.node_id(w.index) for w in self.workers]
        return [node_id for node_id in ids if node_id is not None]

    def temp_dirs(self) -> list[Path]:
        """Every node's Ray temp dir (logs of replicas on worker nodes are under theirs)."""
        workers = recorded_workers(self._head)
        return [Path(self.head.temp_dir), *(w.temp_dir for w in workers if w.temp_dir.exists())]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real local 3-node Ray cluster (head + 2 worker nodes) for the whole test session.

    2 logical CPUs per node on 2 cores (6 in all): Serve replicas (0.5 CPU each) spread over
    the nodes and training fit side by side.
    """
    home = tmp_path_factory.mktemp("ray-home")
    with local_ray_head(home, num_cpus=2) as (info, _env):
        head = LocalRayHead(home, RaySettings(gcs_port=info.gcs_port, object_store_mb=256))
        cluster = LocalCluster(head, info, worker_cpus=2)
        try:
            LocalRayCluster(head).start_workers(info.address, nodes=3)
            yield cluster
        finally:
            LocalRayCluster(head).stop_workers()


@pytest.fixture(scope="session")
def ray_head(ray_cluster: LocalCluster) -> RayHeadInfo:
    """The head of the session's local Ray cluster (see ray_cluster)."""
    return ray_cluster.head


def run_cli(
    *args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run the installed `framecast` console script as a user would."""
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith("FRAMECAST_") and k != "RAY_ADDRESS"
    }
    full_env.update(env or {})
    return subprocess.run(
        [str(FRAMECAST), "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


SHIPPED_MODEL = REPO / "models" / "fashion_mnist_optimized"


@pytest.fixture(scope="session")
def served_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shipped model (FRAMECAST_TEST_ARTIFACT overrides the source)."""
    import shutil

    source = Path(os.environ.get("FRAMECAST_TEST_ARTIFACT", SHIPPED_MODEL))
    target = tmp_path_factory.mktemp("artifact") / "v1"
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def serve_port(ray_head: RayHeadInfo) -> Iterator[int]:
    """Ray Serve started on the session Ray head (this process is its driver), on a free port."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address=ray_head.address, namespace="framecast-tests", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    if ray.is_initialized():  # a later module may have taken the driver connection over
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def stream_app(serve_port: int, served_artifact: Path) -> str:
    """The shipped model deployed as the Serve app the stream classifier calls."""
    from serving.config import ServeSettings
    from serving.deploy import deploy

    settings = ServeSettings(
        app_name="stream",
        route_prefix="/stream",
        http_port=serve_port,
        num_cpus=0.5,
        min_replicas=1,
        max_replicas=1,
    )
    deploy(served_artifact, settings, address=None, namespace="framecast-tests", timeout_s=300)
    return "stream"
