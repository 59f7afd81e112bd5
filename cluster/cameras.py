"""Cameras as a process of their own: ``framecast produce`` run by the demo and the benchmarks.

Cameras are other programs than the classifier; in its process, a producer encoding frames
would share the interpreter lock with the classifier's loop. The child inherits this process's
environment, so the Kafka settings that came from ``FRAMECAST_*`` variables (security
included) apply to it as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from types import TracebackType
from typing import IO, Any

from cluster.settings import FramecastSettings


class CameraProcess:
    """``framecast produce`` in a child process; ``wait()`` returns its JSON summary."""

    def __init__(
        self,
        settings: FramecastSettings,
        bootstrap: str,
        topic: str,
        *,
        source: str,
        cameras: int,
        fps: float,
        per_camera: int,
        encoding: str,
        batch: int = 1,
        linger_ms: int | None = None,
        frame_size: str | None = None,
    ) -> None:
        self.command = [
            sys.executable, "-m", "cluster.cli", "--home", str(settings.home),
            "--bootstrap-servers", bootstrap, "produce", "--source", source,
            "--topic", topic, "--fps", str(fps), "--streams", str(cameras),
            "--count", str(per_camera), "--encoding", encoding, "--batch", str(batch), "--json",
        ]
        if linger_ms is not None:  # else produce's default: streams.producers.camera_linger_ms
            self.command += ["--linger-ms", str(linger_ms)]
        if frame_size is not None:  # e.g. "640x480" (the source's default when None)
            self.command += ["--frame-size", frame_size]
        self.child: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    def start(self) -> CameraProcess:
        # Files, not pipes: nobody reads a pipe while the cameras run, and a full one blocks.
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.child = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err
        )
        return self

    def running(self) -> bool:
        return self.child is not None and self.child.poll() is None

    def wait(self, timeout_s: float = 900.0) -> dict[str, Any]:
        """Wait for the cameras to finish; their summary, or RuntimeError with their stderr."""
        if self.child is None or self._out is None or self._err is None:
            raise RuntimeError("the cameras were not started")
        try:
            code = self.child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"the cameras did not finish within {timeout_s:.0f} s") from None
        self._out.seek(0)
        self._err.seek(0)
        out = self._out.read().decode(errors="replace")
        err = self._err.read().decode(errors="replace")
        if code != 0 or "{" not in out:
            raise RuntimeError(f"the cameras failed (exit {code}): {err[-2000:]}")
        return dict(json.loads(out[out.index("{") :]))

    def stop(self) -> None:
        """End the child if it still runs (SIGTERM, then SIGKILL) and close the files."""
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(timeout=10)
        for handle in (self._out, self._err):
            if handle is not None:
                handle.close()

    def __enter__(self) -> CameraProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def produce_in_subprocess(
    settings: FramecastSettings,
    bootstrap: str,
    topic: str,
    *,
    cameras: int,
    fps: float,
    per_camera: int,
    batch: int,
    linger_ms: int | None = None,
) -> dict[str, Any]:
    """The benchmarks' cameras: a Fashion-MNIST replay of raw frames, waited for."""
    with CameraProcess(
        settings,
        bootstrap,
        topic,
        source="fashion-mnist",
        cameras=cameras,
        fps=fps,
        per_camera=per_camera,
        encoding="raw",
        batch=batch,
        linger_ms=linger_ms,
    ) as process:
        return process.wait()

