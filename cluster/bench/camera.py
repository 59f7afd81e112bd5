"""Camera-resolution pieces of ``framecast bench pipeline --frame-size WxH`` (issue 16 item 8).

- :func:`camera_clip`: a short clip of RGB JPEG frames at the camera's size, encoded once:
  the scenes generator's garments (``serving.scenes``, ground truth in every frame) when it
  is installed, else :func:`cluster.bench.decode.camera_jpeg` frames (no ground truth).
- :func:`produce_clip`: cameras that loop that clip into Kafka (real cameras encode in
  hardware; encoding here would eat the cores the pipeline is measured on), paced at ``fps``
  per camera or flat out; run as a process of its own (``python -m cluster.bench.camera
  produce``), which reports its CPU time apart from the pipeline's.
- :func:`build_rgb_artifact`: an int8 RGB artifact at ``size`` x ``size`` x 3 for the bench
  when no shipped RGB model exists (``models/scenes/``): random weights - the latency of a
  model does not depend on its weights - written and verified like a trained one
  (``python -m cluster.bench.camera artifact DIR``, a child process: TensorFlow).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLIP_FRAMES = 32
JPEG_QUALITY = 85


def parse_frame_size(text: str) -> tuple[int, int]:
    """``WxH`` (e.g. 640x480) as (width, height); ValueError naming the option otherwise."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height)) if sep else (0, 0)
    except ValueError:
        size = (0, 0)
    if not (16 <= size[0] <= 3840 and 16 <= size[1] <= 2160):
        raise ValueError(f"--frame-size: expected WxH within 16x16..3840x2160, got {text!r}")
    return size


def parse_frame_sizes(text: str) -> list[tuple[int, int]]:
    """``WxH[,WxH...]`` (e.g. 640x480,1280x720) as [(width, height), ...]."""
    sizes = [parse_frame_size(part.strip()) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ValueError(f"--frame-size: expected WxH[,WxH...], got {text!r}")
    return sizes


def camera_clip(
    width: int, height: int, frames: int = CLIP_FRAMES, seed: int = 0
) -> tuple[list[tuple[bytes, int | None]], str]:
    """``frames`` RGB JPEGs of width x height (quality 85) with their ground truth (or None),
    and what made them: the scenes generator's heldout style when it is installed and works,
    else camera_jpeg (and why)."""
    try:
        from serving.scenes import render_scenes  # helper "scenes" (issue 16 item 1)

        images, labels = render_scenes(frames, size=(width, height), seed=seed, style="heldout")
    except Exception as error:  # not there yet, or not working: the bench still runs
        from cluster.bench.decode import camera_jpeg

        clip: list[tuple[bytes, int | None]] = [
            (camera_jpeg(width, height, seed=seed + k, quality=JPEG_QUALITY), None)
            for k in range(frames)]
        return clip, f"camera_jpeg (scenes unavailable: {type(error).__name__}: {error})"
    clip = []
    for image, label in zip(images, labels, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        clip.append((buffer.getvalue(), int(label)))
    return clip, "serving.scenes (heldout style)"


def produce_clip(
    settings: Any,
    bootstrap: str,
    topic: str,
    *,
    frame_size: tuple[int, int],
    cameras: int,
    fps: float,
    per_camera: int,
    batch: int = 1,
    linger_ms: int | None = None,
) -> dict[str, Any]:
    """``per_camera`` frames from each camera (camera k starts k frames into the clip), paced
    like ``framecast produce`` (camera k's frame i due at (i + k / cameras) / fps s), Arrow
    messages of ``batch`` frames; a summary with this process's CPU seconds."""
    from confluent_kafka import KafkaError, Message

    from streams.frames import ARROW_CONTENT_TYPE, FrameRecord, encode_frames, warm_up
    from streams.producers import camera_linger_ms, frames_producer

    width, height = frame_size
    clip, made_by = camera_clip(width, height)
    linger_ms = camera_linger_ms(fps) if linger_ms is None else linger_ms
    producer = frames_producer(settings.kafka, bootstrap, linger_ms=linger_ms,
                               max_request_size=settings.topics.max_message_bytes)
    headers: list[tuple[str, str | bytes | None]] = [
        ("content-type", ARROW_CONTENT_TYPE.encode())]
    failures: list[str] = []
    sent = {"messages": 0, "bytes": 0}

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(error.str())

    def send(frames: list[FrameRecord]) -> None:
        value = encode_frames(frames)
        while True:
            try:
                producer.produce(topic, value=value, key=frames[0].stream_id.encode(),
                                 headers=headers, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)
        producer.poll(0)
        sent["messages"] += 1
        sent["bytes"] += len(value)

    warm_up()
    pending: list[list[FrameRecord]] = [[] for _ in range(cameras)]
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for index in range(per_camera):
        for k in range(cameras):
            if fps > 0:
                delay = start + (index + k / cameras) / fps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            data, label = clip[(index + k) % len(clip)]
            pending[k].append(FrameRecord(f"cam-{k}", index, time.time_ns(), "jpeg", height,
                                          width, 3, data, label))
            if len(pending[k]) >= batch or index == per_camera - 1:
                send(pending[k])
                pending[k] = []
    left = producer.flush(60)
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    frames = cameras * per_camera
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if failures or left:
        raise RuntimeError(f"{len(failures) + left} messages not delivered: {failures[:1]}")
    return {
        "frames": frames, **sent,
        "frame_size": f"{width}x{height}", "jpeg_bytes_mean": round(
            sum(len(d) for d, _ in clip) / len(clip)),
        "clip": made_by, "ground_truth": clip[0][1] is not None, "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 1) if seconds > 0 else 0.0,
        "cpu_seconds": round(cpu, 3),
    }


def produce_clip_in_subprocess(
    settings: Any, bootstrap: str, topic: str, *, frame_size: tuple[int, int], cameras: int,
    fps: float, per_camera: int, batch: int = 1, linger_ms: int | None = None,
    timeout_s: float = 900,
) -> dict[str, Any]:
    """:func:`produce_clip` in a process of its own (the environment, hence the Kafka
    security settings, inherited; no secret on its command line)."""
    command = [
        sys.executable, "-m", "cluster.bench.camera", "produce", "--home", str(settings.home),
        "--bootstrap", bootstrap, "--topic", topic,
        "--frame-size", f"{frame_size[0]}x{frame_size[1]}", "--cameras", str(cameras),
        "--fps", str(fps), "--per-camera", str(per_camera), "--batch", str(batch),
    ]
    if linger_ms is not None:
        command += ["--linger-ms", str(linger_ms)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"the cameras failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def build_rgb_artifact(
    directory: Path, *, model: str = "mobilenet_v2", alpha: float = 0.35, size: int = 224,
    seed: int = 0,
) -> Path:
    """An int8 LiteRT + float SavedModel artifact of ``model`` at size x size x 3, random
    weights (the bench's stand-in for ``models/scenes/``), in ``directory``."""
    from jobs.export import convert_tflite, save_float_saved_model
    from jobs.models import ModelSpec, build_model, count_macs
    from jobs.tf_env import keras
    from serving.artifacts import (
        ArtifactManifest,
        InputSpec,
        Optimization,
        Training,
        write_manifest,
    )
    from serving.fashion_mnist import FASHION_MNIST_CLASSES as CLASS_NAMES

    keras.utils.set_random_seed(seed)
    net = build_model(ModelSpec(model, alpha=alpha), (size, size, 3), len(CLASS_NAMES))
    from cluster.bench.decode import camera_jpeg

    calibration = np.stack([np.asarray(Image.open(io.BytesIO(camera_jpeg(size, size, seed=k))))
                            for k in range(16)])
    directory.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    (directory / "model.tflite").write_bytes(convert_tflite(net, "int8", calibration))
    save_float_saved_model(net, directory / "saved_model")
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_content=(directory / "model.tflite").read_bytes())
    scale, zero_point = detail.get_input_details()[0]["quantization"]
    name = f"bench-{model}" + (f"-{alpha:g}" if model == "mobilenet_v2" else "") + f"-{size}"
    manifest = ArtifactManifest(
        name=name, version="random-weights", model=model, classes=list(CLASS_NAMES),
        input=InputSpec(shape=[-1, size, size, 3], dtype="int8", scale=float(scale),
                        zero_point=int(zero_point)),
        param_count=int(net.count_params()), macs=count_macs(net),
        optimization=Optimization(quantization="int8", calibration_samples=len(calibration)),
        training=Training(dataset="none (random weights: latency only)", epochs=0, workers=1,
                          seed=seed, started_at=started, finished_at=datetime.now(UTC)),
    )
    write_manifest(directory, manifest)
    return directory


def build_rgb_artifact_in_subprocess(directory: Path, *, model: str = "mobilenet_v2",
                                     alpha: float = 0.35, size: int = 224) -> Path:
    """:func:`build_rgb_artifact` in a child process (TensorFlow stays out of this one)."""
    command = [sys.executable, "-m", "cluster.bench.camera", "artifact", str(directory),
               "--model", model, "--alpha", str(alpha), "--size", str(size)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise RuntimeError(f"building the RGB bench artifact failed: {done.stderr[-3000:]}")
    return directory


def main(argv: list[str] | None = None) -> None:
    """``produce`` (pre-encoded cameras) and ``artifact`` (the RGB bench model)."""
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.camera")
    steps = parser.add_subparsers(dest="step", required=True)
    produce = steps.add_parser("produce")
    produce.add_argument("--home", required=True)
    produce.add_argument("--bootstrap", required=True)
    produce.add_argument("--topic", required=True)
    produce.add_argument("--frame-size", default="640x480")
    produce.add_argument("--cameras", type=int, default=8)
    produce.add_argument("--fps", type=float, default=15.0)
    produce.add_argument("--per-camera", type=int, default=150)
    produce.add_argument("--batch", type=int, default=1)
    produce.add_argument("--linger-ms", type=int, default=None)
    artifact = steps.add_parser("artifact")
    artifact.add_argument("directory", type=Path)
    artifact.add_argument("--model", default="mobilenet_v2")
    artifact.add_argument("--alpha", type=float, default=0.35)
    artifact.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    if args.step == "artifact":
        build_rgb_artifact(args.directory, model=args.model, alpha=args.alpha, size=args.size)
        print(json.dumps({"artifact": str(args.directory)}))
        return
    from cluster.kafka_security import with_stack_credentials
    from cluster.settings import load_settings

    settings = with_stack_credentials(
        load_settings(home=args.home, kafka={"bootstrap_servers": args.bootstrap}))
    result = produce_clip(
        settings, args.bootstrap, args.topic, frame_size=parse_frame_size(args.frame_size),
        cameras=args.cameras, fps=args.fps, per_camera=args.per_camera, batch=args.batch,
        linger_ms=args.linger_ms)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
