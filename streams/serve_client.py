"""The stream classifier's way into Ray Serve: a handle call per micro-batch."""

from __future__ import annotations

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


class ServeClassify:
    """``classify(frames)``: one handle call of ``classify_frames``; ``close()`` stops the
    handle's router (its background metrics push would otherwise call Ray after the caller
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

    def __call__(self, frames: list[FrameRecord]) -> Any:
        small = (
            self.transport == "grpc"
            and sum(len(f.data) for f in frames) <= GRPC_MAX_FRAME_BYTES
        )
        method = self._grpc if small else self._actor
        return method.remote(frames, topk=False)  # labels need the top class only

    def close(self) -> None:
        """Stop the handle's router (it is shared by both transports)."""
        handle: Any = self._handle  # shutdown() has no annotations
        handle.shutdown()
