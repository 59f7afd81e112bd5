"""Serve calls with an end, without Ray: a fake Serve that answers, refuses or fails."""

from __future__ import annotations

from typing import Any

import pytest

from serving.frames import FrameRecord
from serving.results import ClassifyResult, FrameError
from streams.batching import Batch
from streams.exceptions import StreamsError
from streams.parsing import Item, Source
from streams.serve_calls import Interrupted, ServeCalls

MODEL = {"name": "m", "version": "1", "sha256": None}


class NotNow(Exception):
    """Stands for backpressure: Serve has no replica for us now."""


class Response:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.cancelled = False

    def result(self, timeout_s: float = 0) -> Any:
        if self.outcome == "hang":
            raise TimeoutError
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class FakeServe:
    """Answers every frame, fails any call holding a frame of stream 'poison', refuses
    the first ``refuse`` calls (NotNow), and never answers calls while ``hang``."""

    def __init__(self, refuse: int = 0, hang: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.refuse = refuse
        self.hang = hang
        self.responses: list[Response] = []

    def __call__(self, frames: list[FrameRecord]) -> Response:
        self.calls.append([f.stream_id for f in frames])
        if self.refuse:
            self.refuse -= 1
            outcome: Any = NotNow("no replica")
        elif self.hang:
            outcome = "hang"
        elif any(f.stream_id == "poison" for f in frames):
            outcome = RuntimeError("the replica raised")
        else:
            outcome = [ClassifyResult(f.frame_index % 10, "x", 0.9, MODEL, 0.1) for f in frames]
        response = Response(outcome)
        self.responses.append(response)
        return response


def batch_of(*streams: str) -> Batch:
    batch = Batch()
    for index, stream in enumerate(streams):
        frame = FrameRecord(stream, index, 1, "raw", 1, 1, 1, b"x", None)
        batch.items.append(Item(Source("frames", 0, index, None, 2, None), 0, frame))
    return batch


def calls(serve: FakeServe, **overrides: Any) -> ServeCalls:
    options: dict[str, Any] = {
        "timeout_s": 5.0, "max_attempts": 2, "give_up_s": 60.0, "backoff_max_s": 0.01,
        "keep_alive": lambda _s: None, "answered": lambda: None, "min_failed_wait_s": 0.0,
    }
    options.update(overrides)
    return ServeCalls(serve, (NotNow,), **options)


def test_a_frame_that_breaks_the_replica_is_isolated_and_the_others_are_answered() -> None:
    serve = FakeServe()
    batch = batch_of("a", "b", "poison", "c", "d", "e", "f", "g")
    calling = calls(serve)
    calling.send(batch)
    answers = calling.answers(batch)
    assert [type(a).__name__ for a in answers] == ["ClassifyResult"] * 2 + ["FrameError"] + [
        "ClassifyResult"] * 5
    assert answers[2] == FrameError("replica_error", answers[2].detail, "ServeError")
    assert "RuntimeError" in answers[2].detail
    # Bounded: at most max_attempts calls per split group (2n - 1 groups for n frames).
    assert len(serve.calls) <= 2 * (2 * 8 - 1)
    assert sum("poison" in c for c in serve.calls) <= 2 * 4  # whole, half, quarter, alone


def test_no_replica_now_is_retried_with_the_same_frames_and_is_not_blamed_on_them() -> None:
    serve = FakeServe(refuse=5)
    batch = batch_of("a", "b")
    calling = calls(serve)
    calling.send(batch)
    answers = calling.answers(batch)
    assert all(isinstance(a, ClassifyResult) for a in answers)
    assert serve.calls == [["a", "b"]] * 6  # never split: unavailability is not the frames'


def test_serve_away_longer_than_give_up_stops_with_a_clear_error() -> None:
    serve = FakeServe(refuse=10**6)
    batch = batch_of("a")
    calling = calls(serve, give_up_s=0.05)
    calling.send(batch)
    with pytest.raises(StreamsError, match="no replica for this classifier"):
        calling.answers(batch)


def test_a_call_past_its_time_is_cancelled_before_its_frames_are_sent_again() -> None:
    serve = FakeServe(hang=True)
    batch = batch_of("a")
    calling = calls(serve, timeout_s=0.05)
    calling.send(batch)
    answers = calling.answers(batch)
    assert answers == [FrameError("replica_error", answers[0].detail, "ServeError")]
    assert "serve_timeout_s" in answers[0].detail
    assert len(serve.responses) == 2 and all(r.cancelled for r in serve.responses)


def test_waits_keep_the_member_alive_and_can_be_interrupted() -> None:
    serve = FakeServe(refuse=10**6)
    batch = batch_of("a")
    polls: list[float] = []

    def keep_alive(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) > 3:
            raise Interrupted

    calling = calls(serve, keep_alive=keep_alive, backoff_max_s=0.5)
    calling.send(batch)
    with pytest.raises(Interrupted):
        calling.answers(batch)
    assert len(polls) == 4


def test_an_answer_already_fetched_is_used_as_it_is() -> None:
    serve = FakeServe()
    batch = batch_of("a", "b")
    resumed: list[bool] = []
    calling = calls(serve, answered=lambda: resumed.append(True))
    calling.send(batch)
    assert calling.done(batch) and batch.results is not None
    assert [a.class_id for a in calling.answers(batch)] == [0, 1]  # type: ignore[union-attr]
    assert len(serve.calls) == 1 and resumed == [True]
