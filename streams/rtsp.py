"""Live network cameras for the producers: ``--source rtsp://[user:password@]host[:port]/path``.

:class:`RtspSource` reads an RTSP (or RTSPS) stream with PyAV (FFmpeg's RTSP client, over TCP
by default), H.264 or H.265 or whatever FFmpeg decodes, RGB at native resolution or shrunk to
``max_side``. Each camera of the producer (``--streams N``) opens its own connection, read by
its own thread so that the socket is drained at the camera's pace whatever the producer does:

* **Sampling.** Sample i is the first frame shown at or after ``i / fps`` seconds of stream
  time (the stream's own timestamps, counted from the connection's first frame); frames in
  between are skipped, none is repeated (a camera slower than ``fps`` gives what it has).
  ``fps=0`` takes every frame.
* **A slow producer.** The thread keeps at most ``buffer_s`` seconds of samples; when the
  producer falls further behind, the oldest are dropped (counted in ``dropped``): a live
  camera's frames are worth less the older they get.
* **Drops.** When the stream ends, fails or stays silent for ``read_timeout_s``, the thread
  reconnects with exponential back-off (``backoff_s`` doubling up to ``backoff_max_s``) and
  counts each connection that comes back in ``reconnects``; after ``give_up_s`` without a
  frame it gives up and the producer stops with a SourceError. The first connection is not
  retried: a wrong URL, an unreachable camera or refused credentials fail at start-up.
* **Credentials** may be in the URL (``rtsp://user:password@host/...``) or, better (a command
  line is visible to every user of the machine), in ``FRAMECAST_RTSP_USER`` and
  ``FRAMECAST_RTSP_PASSWORD``. They are never shown: the source's name, repr, errors and log
  lines carry the URL as ``rtsp://***@host/...`` (:func:`redact_url`).

No TensorFlow here: numpy and PyAV only.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np

from streams.exceptions import SourceError
from streams.video import SourceFrame, fit_within

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp://", "rtsps://")
USER_ENV = "FRAMECAST_RTSP_USER"
PASSWORD_ENV = "FRAMECAST_RTSP_PASSWORD"  # noqa: S105 - the name of a variable, not a secret
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")


def is_stream_url(source: str) -> bool:
    """Whether ``--source`` names a network camera (rtsp:// or rtsps://)."""
    return source.lower().startswith(STREAM_SCHEMES)


def redact_url(text: str) -> str:
    """``text`` with the user:password@ of every URL in it replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", text)


def url_with_credentials(url: str, env: Mapping[str, str] | None = None) -> str:
    """``url`` with the credentials of FRAMECAST_RTSP_USER / _PASSWORD when it has none."""
    env = os.environ if env is None else env
    user = env.get(USER_ENV)
    parts = urlsplit(url)
    if not user or "@" in parts.netloc:
        return url
    password = env.get(PASSWORD_ENV, "")
    userinfo = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


def _fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    return (width, height) if max_side <= 0 else fit_within(width, height, max_side)


class _Reader:
    """One camera's connection: a thread that reads, samples and converts, and a queue."""

    def __init__(self, source: RtspSource, index: int) -> None:
        self.source = source
        self.index = index
        capacity = max(4, round(source.buffer_s * (source.fps or 30.0)))
        self.samples: queue.Queue[np.ndarray | SourceError] = queue.Queue(maxsize=capacity)
        self.reconnects = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rtsp-camera-{index}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _put(self, item: np.ndarray | SourceError) -> None:
        while not self._stop.is_set():
            try:
                self.samples.put_nowait(item)
                return
            except queue.Full:
                if isinstance(item, SourceError):  # an error waits for room, never dropped
                    self._stop.wait(0.05)
                    continue
                try:
                    self.samples.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def _run(self) -> None:
        try:
            self._connections()
        except Exception as error:  # the producer must hear of anything, not hang
            self._put(SourceError(redact_url(f"camera {self.source.name} failed: {error!r}")))

    def _connections(self) -> None:
        import av

        source = self.source
        delay = source.backoff_s
        silent_since = time.monotonic()
        connected_before = False
        while not self._stop.is_set():
            try:
                container = av.open(
                    source.url,
                    options=source.options,
                    timeout=(source.open_timeout_s, source.read_timeout_s),
                )
            except (av.FFmpegError, OSError) as error:
                reason = redact_url(str(error)) or type(error).__name__
                if not connected_before:  # a wrong URL or camera: fail at start-up
                    self._put(SourceError(f"cannot open {source.name}: {reason}"))
                    return
            else:
                if connected_before:
                    self.reconnects += 1
                    log.info("camera %d: reconnected to %s", self.index, source.name)
                connected_before = True
                reason = "the stream ended"
                try:
                    with container:
                        for pixels in self._samples(container):
                            self._put(pixels)
                            silent_since = time.monotonic()
                            delay = source.backoff_s
                            if self._stop.is_set():
                                return
                except (av.FFmpegError, OSError, EOFError) as error:
                    reason = redact_url(str(error)) or type(error).__name__
                if self._stop.is_set():
                    return
            if time.monotonic() - silent_since >= source.give_up_s:
                self._put(
                    SourceError(
                        f"{source.name} dropped and did not come back within "
                        f"{source.give_up_s:g} s ({self.reconnects} reconnects); last error: "
                        f"{reason}"
                    )
                )
                return
            log.info(
                "camera %d: %s: %s; reconnecting in %.2f s",
                self.index,
                source.name,
                reason,
                delay,
            )
            self._stop.wait(delay)
            delay = min(delay * 2, source.backoff_max_s)

    def _samples(self, container: Any) -> Iterator[np.ndarray]:
        """The sampled frames of one connection, RGB, shrunk to max_side."""
        video = container.streams.video[0]
        video.thread_type = "AUTO"
        rate = float(video.average_rate or 25)
        step = 1.0 / self.source.fps if self.source.fps > 0 else 0.0
        slack = min(0.005, step / 10)
        base: float | None = None
        last: float | None = None
        next_time = 0.0
        untimed_first = False
        for frame in container.decode(video):
            if frame.time is not None:
                when = float(frame.time)
            elif last is None and not untimed_first:
                untimed_first = True  # FFmpeg's RTSP client hands out the probed first frame
                continue  # untimed, then again with its timestamp
            else:
                when = last + 1.0 / rate if last is not None else 0.0
            last = when
            if base is None:
                base = when
            elapsed = when - base
            if step > 0:
                if elapsed + slack < next_time:
                    continue
                while next_time <= elapsed + slack:
                    next_time += step
            width, height = _fit_within(frame.width, frame.height, self.source.max_side)
            yield frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
            if self._stop.is_set():
                return


class RtspSource:
    """``--source rtsp://...``: a live network camera read with PyAV (module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        fps: float,
        max_side: int = 0,
        transport: str = "tcp",
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 5.0,
        backoff_s: float = 0.25,
        backoff_max_s: float = 8.0,
        give_up_s: float = 60.0,
        buffer_s: float = 2.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not is_stream_url(url):
            raise SourceError(f"not an RTSP URL: {redact_url(url)!r}")
        problems = []
        if max_side != 0 and max_side < 2:
            problems.append(f"max_side must be 0 (native) or >= 2, got {max_side}")
        if transport not in ("tcp", "udp"):
            problems.append(f"RTSP transport must be tcp or udp, got {transport!r}")
        for field, value in (
            ("open_timeout_s", open_timeout_s),
            ("read_timeout_s", read_timeout_s),
            ("backoff_s", backoff_s),
            ("backoff_max_s", backoff_max_s),
            ("give_up_s", give_up_s),
            ("buffer_s", buffer_s),
        ):
            if not value > 0:
                problems.append(f"{field} must be > 0, got {value}")
        if problems:
            raise SourceError("; ".join(problems))
        self.url = url_with_credentials(url, env)
        self.name = redact_url(url)
        self.notes: list[str] = []
        self.fps = fps
        self.max_side = max_side
        # FFmpeg probes a stream for 5 s by default before the first frame comes out, and the
        # frames of those seconds then arrive in a burst, late: 0.5 s finds H.264/H.265 params.
        self.options = {"rtsp_transport": transport, "analyzeduration": "500000"}
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = max(backoff_s, backoff_max_s)
        self.give_up_s = give_up_s
        self.buffer_s = buffer_s
        self._readers: list[_Reader] = []

    def __repr__(self) -> str:
        return f"RtspSource({self.name!r}, fps={self.fps:g}, max_side={self.max_side})"

    @property
    def reconnects(self) -> int:
        """Connections that came back after a drop, all cameras together."""
        return sum(reader.reconnects for reader in self._readers)

    @property
    def dropped(self) -> int:
        """Samples dropped because the producer fell more than ``buffer_s`` behind."""
        return sum(reader.dropped for reader in self._readers)

    def stream(self, index: int) -> Iterator[SourceFrame]:
        """Camera ``index``: its own connection to the camera, sampled at ``fps``."""
        reader = _Reader(self, index)
        self._readers.append(reader)
        try:
            while True:
                try:
                    item = reader.samples.get(timeout=0.5)
                except queue.Empty:
                    if not reader.alive() and reader.samples.empty():
                        raise SourceError(f"{self.name}: camera {index} stopped") from None
                    continue
                if isinstance(item, SourceError):
                    raise item
                yield SourceFrame(pixels=item, label=None)
        finally:
            reader.stop()

    def close(self) -> None:
        """Stop every camera's thread (each returns within its read timeout)."""
        for reader in self._readers:
            reader.stop()
        for reader in self._readers:
            reader.join(1.0)
