"""``framecast dashboard`` as a process of its own, for the demo: the page reads Kafka beside
the classifier without sharing its interpreter (and its GIL), as a user's dashboard would.

The child inherits this process's environment (``FRAMECAST_*``: Kafka security, the token);
its topics, group and port come as flags. If it cannot start, :attr:`error` says why and the
caller goes on without a page.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import httpx

from cluster.dashboard.screenshot import screenshot
from cluster.processes import free_port
from cluster.settings import FramecastSettings


class DashboardProcess:
    """A ``framecast dashboard`` child; :meth:`start`, :meth:`screenshot`, :meth:`stop`."""

    def __init__(
        self,
        settings: FramecastSettings,
        bootstrap: str,
        topics: dict[str, str],
        *,
        classifier_group: str,
        serve_url: str | None = None,
    ) -> None:
        self.settings = settings
        board = settings.dashboard
        port = board.port if _free(board.host, board.port) else free_port(board.host)
        self.host, self.port = board.host, port
        shown = "127.0.0.1" if board.host in ("0.0.0.0", "::") else board.host  # noqa: S104
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
        self.command = [
            sys.executable, "-m", "cluster.cli", "--home", str(settings.home),
            "--bootstrap-servers", bootstrap, "dashboard", "--host", board.host,
            "--port", str(port), "--frames", topics["frames"], "--labels", topics["labels"],
            "--latency", topics["latency"], "--dlq", topics["dlq"],
            "--classifier-group", classifier_group,
            *(["--serve-url", serve_url] if serve_url else []),
        ]
        self.child: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> DashboardProcess:
        """Start it and wait until the page answers (else :attr:`error` says why)."""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.child = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.child.poll() is not None:
                self.error = f"it exited with {self.child.returncode}: {self._tail()}"
                return self
            try:
                if httpx.get(f"{self.url}healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.error = f"it did not answer within {timeout_s:.0f} s: {self._tail()}"
        return self

    def screenshot(self, path: Path) -> str | None:
        """Save the page as ``path``; None when it did, else why not."""
        if self.error is not None:
            return self.error
        token = self.settings.dashboard.token
        return screenshot(self.url, path, token=token.get_secret_value() if token else None)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-600:].decode(errors="replace").strip()


def _free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
