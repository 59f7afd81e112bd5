"""Serve calls with an end: what the classifier does when a call fails.

Two kinds of failure, told apart by the exception:
- *Serve has no replica for us now* (the ``retriable`` errors: backpressure, no replica
  available): not the frames' fault. The same frames are sent again after a back-off
  (0.05 s doubling to ``backoff_max_s``), for at most ``give_up_s``; then
  :class:`~streams.exceptions.StreamsError` stops the classifier, which commits nothing past
  the frames in hand.
- *The call failed while a replica ran it* (the replica raised, died, or did not answer
  within ``timeout_s`` - the call is then cancelled, so it does not go on running while its
  frames are sent again): counted against those frames. After ``max_attempts`` the frames
  are split in halves, each half retried on its own, down to a single frame, which then
  gets ``FrameError("replica_error")`` (its DLQ record) while every other frame is answered.
  A batch of n frames costs at most ``max_attempts * (2n - 1)`` calls.

While it waits, ``keep_alive(seconds)`` is called instead of sleeping (the classifier polls
its paused consumer there, so it stays in its group); it may raise :class:`Interrupted` to
give the work up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import Counter

from serving.frames import FrameRecord
from serving.results import FrameAnswer, FrameError
from streams.batching import Batch
from streams.exceptions import StreamsError

log = logging.getLogger(__name__)

RETRIES = Counter("framecast_stream_serve_retries_total", "Serve calls retried.", ["reason"])
ClassifyFn = Callable[[list[FrameRecord]], Any]
"""Sends frames to Serve; returns an object whose ``result(timeout_s=...)`` gives one
:data:`serving.results.FrameAnswer` per frame (and ``cancel()``)."""


class Interrupted(Exception):
    """The work in hand was given up while waiting (raised by ``keep_alive``)."""


class CallTimeout(Exception):
    """A Serve call that did not answer within its time."""


class ServeCalls:
    """Sends batches to Serve and gets one answer per frame back, retrying as above."""

    def __init__(
        self,
        classify: ClassifyFn,
        retriable: tuple[type[BaseException], ...],
        *,
        timeout_s: float,
        max_attempts: int,
        give_up_s: float | None,
        backoff_max_s: float,
        keep_alive: Callable[[float], None],
        answered: Callable[[], None],
        min_failed_wait_s: float = 0.5,
    ) -> None:
        self.classify = classify
        self.retriable = retriable
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.give_up_s = give_up_s
        self.backoff_max_s = backoff_max_s
        self.keep_alive = keep_alive
        self.answered = answered  # called once a call has answered (the classifier resumes)
        # At least this long after a failed call: a replica that died is replaced meanwhile,
        # and the frames are not blamed for its death within a few milliseconds.
        self.min_failed_wait_s = min_failed_wait_s
        self.calls = 0

    def send(self, batch: Batch) -> None:
        """Start the batch's call (a call that cannot even be sent is retried by answers)."""
        frames = batch.frames
        batch.submitted_ns = time.time_ns()
        if not frames:
            return
        try:
            batch.response = self._send(frames)
        except Exception as error:
            log.warning("Serve call not sent (%s: %s)", type(error).__name__, error)
            batch.response = None

    def done(self, batch: Batch) -> bool:
        """Whether the batch's call has finished, without waiting (a failed call has:
        ``answers`` deals with it)."""
        if batch.response is None or batch.results is not None:
            return True
        try:
            batch.results = list(batch.response.result(timeout_s=0))
        except TimeoutError:  # not yet (Ray's GetTimeoutError is a TimeoutError too)
            return False
        except Exception:
            return True
        return True

    def answers(self, batch: Batch) -> list[FrameAnswer]:
        """One answer per frame of the batch, in order."""
        frames = batch.frames
        if not frames:
            return []
        if batch.results is not None and len(batch.results) == len(frames):
            self.answered()
            return batch.results
        response = batch.response if batch.results is None else None
        return self._call(frames, response, batch)

    def _send(self, frames: list[FrameRecord]) -> Any:
        self.calls += 1
        return self.classify(frames)

    def _call(self, frames: list[FrameRecord], response: Any, batch: Batch) -> list[FrameAnswer]:
        attempts, delay = 0, 0.05
        unavailable_since: float | None = None
        while True:
            try:
                if response is None:
                    batch.submitted_ns = time.time_ns()
                    response = self._send(frames)
                answers = list(self._result(response))
                if len(answers) != len(frames):
                    raise StreamsError(f"Serve answered {len(answers)} of {len(frames)} frames")
                self.answered()
                return answers
            except Interrupted:
                raise
            except self.retriable as error:
                response = None
                unavailable_since = unavailable_since or time.monotonic()
                if (
                    self.give_up_s is not None
                    and time.monotonic() - unavailable_since > self.give_up_s
                ):
                    raise StreamsError(
                        f"Serve has had no replica for this classifier for {self.give_up_s:g}s "
                        f"({type(error).__name__}: {str(error)[:200]}); stopping without "
                        "committing past the frames in hand"
                    ) from None
                self._wait("unavailable", error, delay)
            except Exception as error:
                response = None
                attempts += 1
                if attempts < self.max_attempts:
                    self._wait("failed", error, max(delay, self.min_failed_wait_s))
                elif len(frames) == 1:
                    detail = f"{type(error).__name__}: {str(error)[:500]}"
                    log.error("a frame failed %d Serve calls alone; to the DLQ: %s",
                              attempts, detail)
                    return [FrameError("replica_error", detail, "ServeError")]
                else:
                    half = len(frames) // 2
                    log.warning(
                        "%d frames failed %d Serve calls (%s); splitting them to isolate the "
                        "frame that breaks them", len(frames), attempts, type(error).__name__
                    )
                    return self._call(frames[:half], None, batch) + self._call(
                        frames[half:], None, batch
                    )
            delay = min(delay * 2, self.backoff_max_s)

    def _wait(self, why: str, error: BaseException, delay: float) -> None:
        RETRIES.labels(reason=type(error).__name__).inc()
        log.warning("Serve call %s (%s: %s); retrying in %.2fs", why, type(error).__name__,
                    str(error)[:200], delay)
        until = time.monotonic() + delay
        while time.monotonic() < until:
            self.keep_alive(min(0.2, max(0.0, until - time.monotonic())))

    def _result(self, response: Any) -> list[FrameAnswer]:
        """The call's answer, waiting at most timeout_s (then the call is cancelled)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                wait_s = min(0.5, max(0.0, deadline - time.monotonic()))
                return cast(list[FrameAnswer], response.result(timeout_s=wait_s))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    with contextlib.suppress(Exception):
                        response.cancel()
                    raise CallTimeout(
                        f"no answer within serve_timeout_s={self.timeout_s:g}"
                    ) from None
                self.keep_alive(0.0)
