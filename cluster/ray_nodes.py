"""Worker nodes of the local Ray cluster: ``ray start --address=<head>`` on this machine.

Each worker node has its own temp dir (``<head temp dir>-w<i>``; Ray 2.60 accepts a temp dir
per node, and the session name is the head's), its own CPU share (``--num-cpus``), the custom
resources ``framecast_node`` and ``framecast_node_worker-<i>`` and the node label
``framecast.node=worker-<i>`` (the head gets ``framecast_node_head`` / ``framecast.node=head``),
and the head's auth token. As for the head, the node's processes are found by their command
line naming its temp dir (plus their descendants, the workers), so stopping or killing one
node leaves every other node, and any other Ray on the machine, alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from cluster.processes import free_port, read_state, write_json
from cluster.ray_head import LocalRayHead, _ray_executable, run_ray_start, stop_processes

NODE_LABEL = "framecast.node"
NODE_RESOURCE = "framecast_node"


def node_name(index: int) -> str:
    """The name of node ``index``: ``head`` for 0, ``worker-<i>`` otherwise."""
    return "head" if index == 0 else f"worker-{index}"


def node_resources(index: int) -> dict[str, float]:
    """The custom resources node ``index`` offers (one ``framecast_node`` per node)."""
    return {NODE_RESOURCE: 1.0, f"{NODE_RESOURCE}_{node_name(index)}": 1.0}


def _names_dir(part: str, directory: str) -> bool:
    """True when a command-line part names this directory (not a sibling sharing a prefix)."""
    at = part.find(directory)
    while at != -1:
        end = at + len(directory)
        if end == len(part) or part[end] in "/ ,\"'":
            return True
        at = part.find(directory, at + 1)
    return False


def processes_naming(directory: str) -> list[psutil.Process]:
    """The processes whose command line names ``directory`` (exactly), with their descendants."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == me:
            continue
        cmdline = proc.info.get("cmdline") or []
        if any(_names_dir(part, directory) for part in cmdline):
            found[proc.pid] = proc
            try:
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                continue
    return list(found.values())


def raylet_node_id(procs: list[psutil.Process]) -> str | None:
    """The Ray node id on the raylet's command line among procs (None: no raylet runs)."""
    for proc in procs:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].endswith("/raylet"):
            for part in cmdline:
                if part.startswith("--node_id="):
                    return part.split("=", 1)[1]
    return None


@dataclass
class WorkerNodeInfo:
    """A running worker node of the local cluster, as recorded in HOME/ray/worker-<i>.json."""

    index: int
    name: str
    head_address: str
    temp_dir: str
    num_cpus: int
    resources: dict[str, float]
    started_at: float


class LocalRayWorker:
    """Worker node ``index`` (>= 1) of the local cluster whose head is ``head``."""

    def __init__(self, head: LocalRayHead, index: int) -> None:
        if index < 1:
            raise ValueError("worker nodes are numbered from 1 (0 is the head)")
        self.head = head
        self.index = index
        self.name = node_name(index)
        self.temp_dir = Path(f"{head.temp_dir}-w{index}")
        self.state_file = head.dir / f"worker-{index}.json"
        self.log_file = head.dir / f"ray-start-worker-{index}.log"

    def processes(self) -> list[psutil.Process]:
        """This node's processes (raylet, agents, log monitor) and its workers."""
        return processes_naming(str(self.temp_dir))

    def node_id(self) -> str | None:
        """This node's Ray node id, read from its raylet's command line (None: not running)."""
        return raylet_node_id(self.processes())

    def info(self) -> WorkerNodeInfo | None:
        """The running node's info, or None when its raylet does not run."""
        info = read_state(self.state_file, WorkerNodeInfo)
        if info is None:
            return None
        return info if self.node_id() is not None else None

    def start(self, head_address: str, num_cpus: int, timeout: float = 180.0) -> WorkerNodeInfo:
        """Join the head at head_address (idempotent); returns once ``ray start`` has."""
        running = self.info()
        if running is not None and running.head_address == head_address:
            return running
        if running is not None or self.processes():
            self.stop()  # a node of an earlier head: its raylet cannot join this one
        s = self.head.settings
        resources = node_resources(self.index)
        cmd = [
            _ray_executable(),
            "start",
            f"--address={head_address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--labels={NODE_LABEL}={self.name}",
            f"--object-store-memory={s.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        env = {**os.environ, **self.head.client_env()}
        self.head.dir.mkdir(parents=True, exist_ok=True)
        run_ray_start(cmd, env, self.log_file, f"`ray start` of {self.name}", self.processes,
                      timeout)
        info = WorkerNodeInfo(
            index=self.index,
            name=self.name,
            head_address=head_address,
            temp_dir=str(self.temp_dir),
            num_cpus=num_cpus,
            resources=resources,
            started_at=time.time(),
        )
        write_json(self.state_file, asdict(info))
        return info

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop every process of this node (SIGTERM, then SIGKILL); False if none ran."""
        self.state_file.unlink(missing_ok=True)
        return stop_processes(self.processes, timeout)

    def kill(self) -> list[int]:
        """SIGKILL the node's raylet and all its processes at once: a crash, not a drain."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        self.state_file.unlink(missing_ok=True)
        return [proc.pid for proc in procs]


def recorded_workers(head: LocalRayHead) -> list[LocalRayWorker]:
    """Every worker node with a state file or a temp dir under this head, by index."""
    indexes: set[int] = set()
    for path in head.dir.glob("worker-*.json"):
        with contextlib.suppress(ValueError):
            indexes.add(int(path.stem.removeprefix("worker-")))
    for path in Path(head.temp_dir).parent.glob(f"{Path(head.temp_dir).name}-w*"):
        with contextlib.suppress(ValueError):
            indexes.add(int(path.name.rsplit("-w", 1)[1]))
    return [LocalRayWorker(head, i) for i in sorted(i for i in indexes if i >= 1)]


def head_node_id(head: LocalRayHead) -> str | None:
    """The head's Ray node id, from its raylet's command line (None: not running)."""
    return raylet_node_id(processes_naming(str(head.temp_dir)))


class LocalRayCluster:
    """The head plus ``settings.nodes - 1`` worker nodes, all on this machine."""

    def __init__(self, head: LocalRayHead) -> None:
        self.head = head

    def worker(self, index: int) -> LocalRayWorker:
        """Worker node ``index`` (running or not)."""
        return LocalRayWorker(self.head, index)

    def workers(self) -> list[WorkerNodeInfo]:
        """The worker nodes that run now."""
        return [info for w in recorded_workers(self.head) if (info := w.info()) is not None]

    def start_workers(self, head_address: str, nodes: int | None = None) -> list[WorkerNodeInfo]:
        """Start the worker nodes 1..nodes-1 that do not run yet, side by side (idempotent).

        Worker nodes past ``nodes`` that already run are left running: a later ``up`` with
        fewer nodes (the demo's, the benchmarks') must not take nodes from a running cluster.
        """
        from concurrent.futures import ThreadPoolExecutor

        count = self.head.settings.nodes if nodes is None else nodes
        cpus = self.head.settings.worker_cpus
        indexes = range(1, count)
        if not indexes:
            return []
        with ThreadPoolExecutor(max_workers=len(indexes)) as pool:
            futures = [pool.submit(self.worker(i).start, head_address, cpus) for i in indexes]
            return [future.result() for future in futures]

    def stop_workers(self) -> list[int]:
        """Stop every worker node of this head; returns the indexes that were running."""
        return [w.index for w in recorded_workers(self.head) if w.stop()]
