"""The stream classifier's way into Ray Serve: a handle call per micro-batch."""

from __future__ import annotations

from typing import Any

from serving.frames import FrameRecord


def serve_classify_fn(app_name: str) -> tuple[Any, tuple[type[BaseException], ...]]:
    """(classify(frames) -> response, the errors after which the same call is retried).

    Needs a Ray connection (``ray.init``). Retried: backpressure, a replica or the
    controller dying mid-request, timeouts - anything that says "not now" rather than
    "this frame is bad" (bad frames come back as per-frame errors, not exceptions).
    """
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.exceptions import BackPressureError, RayServeException

    handle = serve.get_app_handle(app_name)

    def classify(frames: list[FrameRecord]) -> Any:
        return handle.classify_frames.remote(frames, topk=False)  # labels need the top class

    return classify, (BackPressureError, RayServeException, RayError, TimeoutError)
