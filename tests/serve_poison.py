"""A test double of the model server: a real Ray Serve deployment whose ``classify_frames``
answers like the Classifier replicas (one :class:`serving.results.ClassifyResult` per frame)
but raises ``RuntimeError`` on any call that holds a frame of stream ``poison`` - a replica
that fails deterministically on one input. It counts its calls, so a test can tell that the
stream classifier gave up on the frame instead of retrying it forever.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serving.frames import FrameRecord
from serving.results import ClassifyResult

POISON_STREAM = "poison"
MODEL = {"name": "poison-double", "version": "1", "sha256": "0" * 64}


@serve.deployment(name="Classifier", ray_actor_options={"num_cpus": 0.1})
class PoisonClassifier:
    """Labels every frame class 0, and raises on a call with a poison frame."""

    def __init__(self) -> None:
        self.calls = 0
        self.poisoned_calls = 0
        self.frames_labelled = 0

    def classify_frames(self, frames: list[FrameRecord], topk: bool = True) -> list[Any]:
        self.calls += 1
        if any(f.stream_id == POISON_STREAM for f in frames):
            self.poisoned_calls += 1
            raise RuntimeError(f"poisoned frame in a call of {len(frames)} frames")
        self.frames_labelled += len(frames)
        return [ClassifyResult(0, "T-shirt/top", 1.0, MODEL, 0.1) for _ in frames]

    def counts(self) -> dict[str, int]:
        """Calls received, calls that raised, frames labelled."""
        return {
            "calls": self.calls,
            "poisoned_calls": self.poisoned_calls,
            "frames_labelled": self.frames_labelled,
        }


def deploy_poison_app(name: str) -> Any:
    """Run the double as Serve application ``name`` (route /name); returns its handle."""
    return serve.run(PoisonClassifier.bind(), name=name, route_prefix=f"/{name}")
