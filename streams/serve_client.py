"""The stream classifier's way into Ray Serve: a handle call per micro-batch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Any

from serving.frames import FrameRecord

# Frame bytes per gRPC call, under the replicas' 4 MiB message limit with room for the rest.
GRPC_MAX_FRAME_BYTES = 3 * 1024 * 1024


def serve_classify_fn(
    app_name: str, transport: str = "grpc"
) -> tuple[Any, tuple[type[BaseException], ...]]:
    """(classify(frames) -> response, the errors that mean "Serve has no replica for us now").

    Needs a Ray connection (``ray.init``). Those errors (backpressure, no replica available)
    are not the frames' fault: the classifier retries them for as long as
    ``serve_give_up_s``. Any other failure of a call (the replica raised, died or timed out
    on the frames) counts against the frames (see ``streams.classifier``); bad frames
    themselves come back as per-frame ``FrameError`` answers, not exceptions.

    ``transport="grpc"`` sends each call straight to a replica's gRPC server (frames and
    results pickled); ``"actor"`` uses Ray actor calls with results by reference, which
    cost about twice the CPU per call (docs/BENCHMARKS.md, "Figures behind choices in the
    code") - at hundreds of calls a second that is most of a core. A replica's gRPC server
    takes messages of up to 4 MiB (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``), so a
    batch with more frame data than ``GRPC_MAX_FRAME_BYTES`` goes as an actor call (through
    the object store), whatever the transport.
    """
    from ray.exceptions import ActorUnavailableError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    return ServeClassify(app_name, transport), (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        ActorUnavailableError,
    )


class Answer:
    """A Serve call's answer, awaited in the background from the moment the call is made.

    ``DeploymentResponse.result(timeout_s=0)``, polled, only starts waiting for a gRPC reply
    on its first call after the replica was picked, so each call's answer was seen a poll
    later than it arrived (a poll is up to 2 ms); ``await``ing the response on a loop of our
    own sees it as it lands (measured: a 1-frame call's round trip p50 9.8 -> 7.7-8.9 ms,
    polled every 2 ms; 6.9 ms when blocking on it).
    """

    def __init__(self, response: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.response = response
        self.future = asyncio.run_coroutine_threadsafe(_answer(response), loop)

    def result(self, timeout_s: float | None = None) -> Any:
        """The answer (or the call's error); TimeoutError if it has not come within
        ``timeout_s``."""
        try:
            return self.future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError("no answer yet") from None

    def cancel(self) -> None:
        """Cancel the call (and stop waiting for it)."""
        self.response.cancel()
        self.future.cancel()


async def _answer(response: Any) -> Any:
    return await response


async def _cancel_all() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class ServeClassify:
    """``classify(frames)``: one handle call of ``classify_frames``, its :class:`Answer`
    awaited on a loop thread of this object's; ``close()`` stops that loop and the handle's
    router (its background metrics push would otherwise call Ray after the caller
    disconnected - and Ray then starts a local instance of its own to answer it)."""

    def __init__(self, app_name: str, transport: str) -> None:
        from ray import serve

        if transport not in ("grpc", "actor"):
            raise ValueError(f"transport must be 'grpc' or 'actor', not {transport!r}")
        self.transport = transport
        self._handle = serve.get_app_handle(app_name)
        self._actor = self._handle.classify_frames
        # Pickled both ways: a response can be an exception (a replica's error,
        # backpressure), which JSON cannot carry.
        self._grpc = self._handle.options(
            _by_reference=False, request_serialization="pickle", response_serialization="pickle"
        ).classify_frames
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="serve-answers", daemon=True
        )
        self._thread.start()

    def __call__(self, frames: list[FrameRecord]) -> Answer:
        small = (
            self.transport == "grpc"
            and sum(len(f.data) for f in frames) <= GRPC_MAX_FRAME_BYTES
        )
        method = self._grpc if small else self._actor
        # labels need the top class only
        return Answer(method.remote(frames, topk=False), self._loop)

    def close(self) -> None:
        """Stop the answers' loop (cancelling the waits still on it) and the handle's
        router (shared by both transports)."""
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        handle: Any = self._handle  # shutdown() has no annotations
        handle.shutdown()
