"""serving.inference: a call's frames through the model outside Serve (the replica's code)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from serving.fashion_mnist import load_fashion_mnist
from serving.frames import FrameRecord
from serving.inference import CallLimits, LocalClassify
from serving.results import ClassifyResult, FrameError
from serving.runtimes import LiteRTRuntime

STREAM_MODEL = Path(__file__).resolve().parents[2] / "models" / "fashion_mnist_stream"
IMAGES, LABELS = load_fashion_mnist("test", limit=16)


def raw(i: int) -> FrameRecord:
    return FrameRecord(stream_id="cam", frame_index=i, captured_at_ns=time.time_ns(),
                       encoding="raw", height=28, width=28, channels=1,
                       data=IMAGES[i].tobytes(), label=int(LABELS[i]))


def test_local_classify_answers_as_litert_and_refuses_bad_frames_per_frame() -> None:
    classify = LocalClassify(str(STREAM_MODEL), limits=CallLimits(max_batch_size=4,
                                                                    max_call_frames=12))
    try:
        frames = [raw(i) for i in range(10)]
        frames.insert(3, FrameRecord(stream_id="cam", frame_index=99, captured_at_ns=1,
                                     encoding="jpeg", height=28, width=28, channels=1,
                                     data=b"\xff\xd8 not a jpeg"))
        frames += [raw(10), raw(11)]  # 13 frames: the last is over max_call_frames
        answers = classify(frames).result(timeout_s=60)
        assert len(answers) == 13
        assert isinstance(answers[3], FrameError) and answers[3].reason == "undecodable"
        assert isinstance(answers[12], FrameError) and answers[12].reason == "too_many_frames"
        direct = (LiteRTRuntime(STREAM_MODEL / "model.tflite")
                  .predict(IMAGES[:, :, :, None] / np.float32(255)).argmax(axis=1))
        good = [a for k, a in enumerate(answers) if k not in (3, 12)]
        assert all(isinstance(a, ClassifyResult) for a in good)
        assert [a.class_id for a in good] == [int(direct[i]) for i in range(11)]  # type: ignore[union-attr]
        assert all(a.topk is None and a.inference_ms > 0 for a in good)  # type: ignore[union-attr]
        assert classify([]).result(timeout_s=10) == []
    finally:
        classify.close()


def test_local_classify_refuses_an_artifact_it_cannot_verify(tmp_path: Path) -> None:
    import shutil

    from serving.artifacts import ArtifactError

    copy = tmp_path / "model"
    shutil.copytree(STREAM_MODEL, copy)
    with (copy / "model.tflite").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match=r"model\.tflite"):
        LocalClassify(str(copy))
