"""The local Ray head: ``ray start --head`` with its own temp dir, stopped by that temp dir.

``ray stop`` kills every Ray process on the machine; framecast instead finds the processes
whose command line names this head's temp dir (plus their descendants, the workers) and
stops only those, so a developer's other Ray sessions survive ``framecast down``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from cluster.exceptions import PortInUseError, RayHeadError
from cluster.processes import (
    free_port,
    log_tail,
    port_answers,
    port_is_free,
    read_state,
    terminate,
    write_json,
)
from cluster.settings import RaySettings


@dataclass
class RayHeadInfo:
    """What a running local Ray head looks like from outside."""

    address: str
    gcs_port: int
    dashboard_url: str
    temp_dir: str
    num_cpus: int | None
    started_at: float


def use_ray_auth_env(env: dict[str, str]) -> None:
    """Put Ray auth env vars into this process and make an already-imported Ray see them.

    Ray caches its config and the token when ``ray._raylet`` is first used; both caches are
    refreshed here so that a later ``ray.init`` sends the right token.
    """
    os.environ.update(env)
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def run_ray_start(
    cmd: list[str],
    env: dict[str, str],
    log_file: Path,
    what: str,
    processes: Callable[[], list[psutil.Process]],
    timeout: float,
) -> None:
    """Run a `ray start` command to its end, its output into log_file; on a failure or a
    timeout stop what it started (``processes()``) and raise RayHeadError naming ``what``."""
    with log_file.open("wb") as log_handle:
        try:
            result = subprocess.run(
                cmd,
                env=env,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            terminate(processes(), 10)
            raise RayHeadError(f"{what} did not finish within {timeout:.0f}s") from None
    if result.returncode != 0:
        terminate(processes(), 10)
        raise RayHeadError(
            f"{what} failed (exit {result.returncode}); last lines of "
            f"{log_file}:\n{log_tail(log_file)}"
        )


def stop_processes(processes: Callable[[], list[psutil.Process]], timeout: float) -> bool:
    """Stop what ``processes()`` finds (SIGTERM, then SIGKILL), sweeping until a scan comes
    back empty: some helpers (the Ray Client proxy) are spawned a moment after `ray start`
    returns. False if nothing was running; RayHeadError if processes survive SIGKILL."""
    stopped = False
    for _ in range(5):
        procs = processes()
        if not procs:
            return stopped
        terminate(procs, timeout)
        stopped = True
    leftovers = processes()
    if leftovers:
        raise RayHeadError(f"Ray processes survived SIGKILL: {[p.pid for p in leftovers]}")
    return stopped


class LocalRayHead:
    """A Ray head node on this machine whose state lives under ``home/ray``."""

    def __init__(self, home: Path, settings: RaySettings) -> None:
        self.dir = Path(home) / "ray"
        self.settings = settings
        self.state_file = self.dir / "head.json"
        self.log_file = self.dir / "ray-start.log"
        # Unix socket paths are limited to ~107 bytes, so the temp dir lives under /tmp,
        # named after the home directory so that two checkouts do not collide.
        digest = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:10]
        self.temp_dir = Path("/tmp") / f"framecast-ray-{digest}"  # noqa: S108 - short path on purpose

    @property
    def token_file(self) -> Path:
        """The head's own Ray auth token (mode 0600), made on first start."""
        return self.dir / "auth_token"

    def client_env(self, *, create: bool = False) -> dict[str, str]:
        """Env vars under which Ray clients (and the head) use this head's token auth.

        Ray 2.60 turns token authentication on whenever a token file exists, so the head
        and every client are told explicitly which token to use (never ~/.ray/auth_token,
        which another Ray on this machine may own).
        """
        if create and not self.token_file.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file.resolve())}

    def processes(self) -> list[psutil.Process]:
        """This head's processes and all their descendants.

        Most name the temp dir on their command line; the Ray Client proxy only names the
        GCS address (``--address=IP:PORT``), so that is matched too.
        """
        markers = (str(self.temp_dir),)
        gcs_suffix = f":{self.settings.gcs_port}"
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            ours = any(markers[0] in part for part in cmdline) or (
                any("ray" in part for part in cmdline[:3])
                and any(p.startswith("--address=") and p.endswith(gcs_suffix) for p in cmdline)
            )
            if ours:
                found[proc.pid] = proc
                try:
                    for child in proc.children(recursive=True):
                        found.setdefault(child.pid, child)
                except psutil.Error:
                    continue
        return list(found.values())

    def info(self) -> RayHeadInfo | None:
        """The running head's info, or None when it is not running."""
        info = read_state(self.state_file, RayHeadInfo)
        if info is None:
            return None
        if not port_answers(info.gcs_port) or not self.processes():
            return None
        return info

    def start(self, timeout: float = 180.0) -> RayHeadInfo:
        """Start the head (idempotent) and wait until its GCS answers."""
        running = self.info()
        if running is not None:
            return running
        s = self.settings
        for name, port in (("Ray GCS port", s.gcs_port), ("Ray dashboard port", s.dashboard_port)):
            if not port_is_free(port):
                raise PortInUseError(
                    f"{name} {port} is already in use (another Ray?); set FRAMECAST_RAY_GCS_PORT / "
                    "FRAMECAST_RAY_DASHBOARD_PORT, or use that cluster with --ray-address"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            _ray_executable(),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={s.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={s.dashboard_port}",
            f"--object-store-memory={s.object_store_mb * 1024 * 1024}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            # Ray's fixed defaults for these two would collide with a second Ray on the host.
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        num_cpus = s.head_num_cpus
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        # The head is node "head" of the cluster: the same custom resource and label as every
        # worker node (cluster.ray_nodes), so actors can be pinned or spread by node name.
        cmd += [
            '--resources={"framecast_node": 1, "framecast_node_head": 1}',
            "--labels=framecast.node=head",
        ]
        env = {**os.environ, **self.client_env(create=True)}
        run_ray_start(cmd, env, self.log_file, "`ray start --head`", self.processes, timeout)
        info = RayHeadInfo(
            address=f"127.0.0.1:{s.gcs_port}",
            gcs_port=s.gcs_port,
            dashboard_url=f"http://127.0.0.1:{s.dashboard_port}",
            temp_dir=str(self.temp_dir),
            num_cpus=num_cpus,
            started_at=time.time(),
        )
        write_json(self.state_file, asdict(info))
        return info

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop every process of this head; False if none was running."""
        self.state_file.unlink(missing_ok=True)
        return stop_processes(self.processes, timeout)
