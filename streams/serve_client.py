"""The stream classifier's way into Ray Serve: a handle call per micro-batch."""

from __future__ import annotations

from typing import Any

from serving.frames import FrameRecord


def serve_classify_fn(
    app_name: str, transport: str = "grpc"
) -> tuple[Any, tuple[type[BaseException], ...]]:
    """(classify(frames) -> response, the errors after which the same call is retried).

    Needs a Ray connection (``ray.init``). Retried: backpressure, a replica or the
    controller dying mid-request, timeouts - anything that says "not now" rather than
    "this frame is bad" (bad frames come back as per-frame errors, not exceptions).

    ``transport="grpc"`` sends each call straight to a replica's gRPC server (frames
    pickled, results as JSON); ``"actor"`` uses Ray actor calls with results by reference.
    Measured on 2 cores (2 frames a call): 4.0 vs 8.4 ms of CPU per call, caller and replica
    together - at hundreds of calls a second that is most of a core.
    """
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.exceptions import BackPressureError, RayServeException

    handle = serve.get_app_handle(app_name)
    if transport == "grpc":
        handle = handle.options(
            _by_reference=False, request_serialization="pickle", response_serialization="orjson"
        )
    elif transport != "actor":
        raise ValueError(f"transport must be 'grpc' or 'actor', not {transport!r}")

    def classify(frames: list[FrameRecord]) -> Any:
        return handle.classify_frames.remote(frames, topk=False)  # labels need the top class

    return classify, (BackPressureError, RayServeException, RayError, TimeoutError)
