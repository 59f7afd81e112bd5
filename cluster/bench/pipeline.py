"""`framecast bench pipeline`: the whole Kafka -> Serve -> Kafka path at several offered loads
(cameras x fps) and flat out, next to a naive baseline - one consumer calling Keras float
``predict`` per frame, as per-message ML-on-Kafka systems do. Measured on this machine, in the
same run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cluster import stack
from cluster.bench.runs import drop_topics, fresh_topics, label_summary, read_labels
from cluster.cameras import produce_in_subprocess
from cluster.settings import FramecastSettings
from jobs.machine import describe
from streams.topics import topic_names


def _pipeline_run(
    settings: FramecastSettings,
    bootstrap: str,
    *,
    cameras: int,
    fps: float,
    per_camera: int,
    batch: int,
    classifier: str,
    max_wait_ms: int | None = None,
    in_flight: int = 2,
    linger_ms: int | None = None,
    artifact: Path | None = None,
    frame_size: tuple[int, int] | None = None,
    labels_out: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One measured run on fresh topics: the stream classifier (`classifier="framecast"`) or
    the naive baseline (`"naive"`, which loads `artifact` itself), cameras in a process of
    their own: Fashion-MNIST raw frames, or with ``frame_size`` (width, height) a clip of
    RGB JPEGs encoded once and looped (cluster.bench.camera)."""
    from streams.runner import StreamRun

    topics = fresh_topics(settings, bootstrap, partitions=4)
    names = topic_names(topics)
    total = cameras * per_camera
    outcome: dict[str, Any] = {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(drop_topics, settings, bootstrap, names)
        if classifier == "framecast":
            config = settings.stream.model_copy(
                update={
                    "group": f"bench-{names['frames']}",
                    "max_batch_wait_ms": (
                        settings.stream.max_batch_wait_ms if max_wait_ms is None else max_wait_ms
                    ),
                    "max_in_flight": in_flight,
                    "max_batch_frames": 512,
                    "idle_exit_s": 60.0,  # a safety net: max_frames ends the run
                    "max_frames": total,
                }
            )
            run = cleanup.enter_context(
                StreamRun(settings.kafka, bootstrap, topics, config, settings.serve,
                          create_topics=False)
            )
            run.start()
            run.wait_assigned(timeout_s=120)  # measure the pipeline, not its start-up
            finish = lambda: outcome.update(run.finish(timeout_s=600))  # noqa: E731
        else:
            if artifact is None:
                raise ValueError("the naive baseline needs the artifact it loads")
            ready = threading.Event()
            worker = threading.Thread(
                target=lambda: outcome.update(
                    _naive_baseline(settings, bootstrap, names, total, ready, artifact)),
                daemon=True,
            )
            worker.start()
            ready.wait(timeout=120)
            finish = lambda: worker.join(timeout=600)  # noqa: E731
        # The cameras are another process, as they would be: the producer does not share
        # this process's interpreter lock with the classifier.
        if frame_size is None:
            produced = produce_in_subprocess(
                settings, bootstrap, names["frames"], cameras=cameras, fps=fps,
                per_camera=per_camera, batch=batch, linger_ms=linger_ms,
            )
        else:
            from cluster.bench.camera import produce_clip_in_subprocess

            produced = produce_clip_in_subprocess(
                settings, bootstrap, names["frames"], frame_size=frame_size, cameras=cameras,
                fps=fps, per_camera=per_camera, batch=batch, linger_ms=linger_ms,
            )
        finish()
        labels = read_labels(settings, bootstrap, names["labels"], total, timeout_s=60)
    if labels_out is not None:  # the labels themselves (cluster.bench.parts)
        labels_out.extend(labels)
    return {
        "classifier": classifier,
        "cameras": cameras,
        "fps_per_camera": fps,
        "offered_fps": cameras * fps if fps else None,
        "frames": total,
        "labels": len(labels),
        "produce_fps": produced.get("fps"),
        "producer": produced,
        **label_summary(labels),
        "classifier_totals": outcome,
    }


def _naive_baseline(
    settings: FramecastSettings, bootstrap: str, names: dict[str, str], total: int,
    ready: threading.Event, artifact: Path,
) -> dict[str, Any]:
    """One consumer, Keras float predict() per frame, one label message per frame."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras
    from confluent_kafka import Consumer, Producer

    from serving.frames import decode_frames
    from serving.results import ClassifyResult
    from streams.client import rdkafka_callbacks
    from streams.labels import encode_label, label_record

    loaded = tf.saved_model.load(str(artifact / "saved_model"))  # kept: it owns the variables
    signature = loaded.signatures["serving_default"]
    (input_name,) = signature.structured_input_signature[1].keys()
    (output_name,) = signature.structured_outputs.keys()

    class SavedModelAsKeras(keras.Model):
        def call(self, images: Any) -> Any:
            return signature(**{input_name: images})[output_name]

    model = SavedModelAsKeras()
    model.saved_model = loaded
    client = {
        **settings.kafka.rdkafka_config(bootstrap),
        **rdkafka_callbacks(logging.getLogger(f"{__name__}.naive")),
    }
    consumer = Consumer(
        {
            **client,
            "group.id": f"naive-{names['frames']}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    consumer.subscribe([names["frames"]])
    producer = Producer({**client, "acks": "all"})
    model.predict(np.zeros((1, 28, 28, 1), np.float32), verbose=0)  # build before the clock
    while not consumer.assignment():
        consumer.poll(0.2)  # no frames yet: the cameras start once this is set
    ready.set()
    done = 0
    deadline = time.monotonic() + 600
    while done < total and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=100, timeout=0.5):
            value = message.value()
            if message.error() is not None or value is None:
                continue
            for row, frame in enumerate(decode_frames(value)):
                pixels = np.frombuffer(frame.data, np.uint8).reshape(1, 28, 28, 1) / 255.0
                probs = model.predict(pixels.astype(np.float32), verbose=0)[0]
                class_id = int(np.argmax(probs))
                labeled = time.time_ns()
                record = label_record(
                    stream_id=frame.stream_id,
                    frame_index=frame.frame_index,
                    topic=names["frames"],
                    partition=message.partition() or 0,
                    offset=message.offset() or 0,
                    row=row,
                    result=ClassifyResult(
                        class_id,
                        str(class_id),
                        float(probs[class_id]),
                        {"name": "naive", "version": "keras-float", "sha256": None},
                        0.0,
                    ),
                    captured_at_ns=frame.captured_at_ns,
                    labeled_at_ns=labeled,
                    timings_ms={"end_to_end": (labeled - frame.captured_at_ns) / 1e6},
                    ground_truth=frame.label,
                )
                producer.produce(
                    names["labels"], key=frame.stream_id.encode(), value=encode_label(record)
                )
                producer.poll(0)
                done += 1
    producer.flush(30)
    consumer.close()
    return {"labelled": done}


def bench_pipeline(
    settings: FramecastSettings, artifact: Path, console: Console, *, quick: bool
) -> dict[str, Any]:
    """Sustained frames/s and latency at several offered loads, vs the naive baseline."""
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown

    bootstrap = stack.kafka_bootstrap(settings)
    seconds = 8 if quick else 20
    loads = [(4, 30.0), (16, 30.0), (33, 30.0)] if not quick else [(4, 30.0), (33, 30.0)]
    results: dict[str, Any] = {"machine": describe(), "artifact": str(artifact), "runs": []}
    serve_settings = settings.serve.model_copy(
        update={"num_cpus": 1.0, "min_replicas": 1, "max_replicas": 1}
    )
    with stack.ray_connection(settings):
        deploy(artifact, serve_settings, address=None, namespace=settings.ray.namespace)
        settings = settings.model_copy(update={"serve": serve_settings})
        # Not measured: the broker's JVM compiles its hot paths in the first seconds of load
        # (a freshly started stack's first run has a p99 several times the later runs':
        # docs/BENCHMARKS.md), and Serve's router, the replica and the clients warm up too.
        warm_cameras, warm_fps = loads[-1]
        warmup = _pipeline_run(
            settings, bootstrap, cameras=warm_cameras, fps=warm_fps,
            per_camera=int(warm_fps * (5 if quick else 10)), batch=1, classifier="framecast",
        )
        results["warmup"] = {k: warmup[k] for k in ("offered_fps", "frames", "labels", "p99_ms")}
        console.print(f"  warm-up (not measured): {warmup['frames']} frames at "
                      f"{warm_cameras}x{warm_fps:g} fps, p99 {warmup['p99_ms']} ms")
        for cameras, fps in loads:
            run = _pipeline_run(
                settings,
                bootstrap,
                cameras=cameras,
                fps=fps,
                per_camera=int(fps * seconds),
                batch=1,
                classifier="framecast",
            )
            results["runs"].append(run)
            console.print(
                f"  framecast {cameras}x{fps:g} fps offered: sustained "
                f"{run['sustained_fps']} frames/s, p50 {run['p50_ms']} ms, "
                f"p99 {run['p99_ms']} ms"
            )
        flat = 12000 if quick else 60000
        run = _pipeline_run(
            settings,
            bootstrap,
            cameras=4,
            fps=0,
            per_camera=flat // 4,
            batch=64,
            classifier="framecast",
        )
        results["runs"].append(run)
        console.print(f"  framecast flat out (64 frames/message): {run['sustained_fps']} frames/s")
        serve_shutdown(serve_settings.app_name, address=None, namespace=settings.ray.namespace)
        # Still connected: the Serve handle's background metrics push would otherwise
        # auto-start a second, local Ray instance beside the baseline.
        naive_frames = 300 if quick else 1000
        run = _pipeline_run(
            settings,
            bootstrap,
            cameras=4,
            fps=0,
            per_camera=naive_frames // 4,
            batch=1,
            classifier="naive",
            artifact=artifact,
        )
        results["runs"].append(run)
    console.print(f"  naive Keras predict per frame, flat out: {run['sustained_fps']} frames/s")
    best = max((r["sustained_fps"] or 0) for r in results["runs"] if r["classifier"] == "framecast")
    results["ratio_vs_naive"] = round(best / max(run["sustained_fps"] or 1e-9, 1e-9), 1)
    return results


# -- camera resolution (issue 16 item 8) --------------------------------------------------------

SHIPPED_RGB_MODEL = Path(__file__).resolve().parents[2] / "models" / "scenes"


def rgb_artifact(settings: FramecastSettings, artifact: Path | None,
                 log: Any = print) -> Path:
    """The RGB model to measure: ``artifact``, else the shipped ``models/scenes``, else the
    bench's random-weight MobileNetV2 0.35 at 224x224x3 int8 (built once under the home)."""
    from serving.artifacts import ArtifactError, load_artifact

    if artifact is not None:
        return artifact
    if (SHIPPED_RGB_MODEL / "manifest.json").is_file():
        return SHIPPED_RGB_MODEL
    cached = settings.home / "bench" / "rgb-mobilenet_v2-0.35-224"
    try:
        load_artifact(cached)
        return cached
    except ArtifactError:
        pass
    import shutil

    from cluster.bench.camera import build_rgb_artifact_in_subprocess

    shutil.rmtree(cached, ignore_errors=True)
    log("  building the RGB bench model (MobileNetV2 0.35, 224x224x3 int8, random weights)")
    return build_rgb_artifact_in_subprocess(cached)


def model_ms_per_frame(artifact: Path, batch: int = 16, repeats: int = 20) -> dict[str, Any]:
    """The model's own ms per frame at ``batch`` (one thread, as a replica runs it): the
    other side of the decode share."""
    import statistics

    from serving.artifacts import load_artifact
    from serving.runtimes import select_runtime

    runtime = select_runtime(load_artifact(artifact), num_threads=1)
    frames = [np.random.default_rng(k).integers(0, 256, runtime.input_hwc, dtype=np.uint8)
              for k in range(batch)]
    runtime.predict_pixels(frames)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runtime.predict_pixels(frames)
        times.append((time.perf_counter() - started) * 1000 / batch)
    return {"batch": batch, "p50_ms": round(statistics.median(times), 3),
            "input_hwc": list(runtime.input_hwc), "runtime": runtime.kind,
            "precision": runtime.precision}


def decode_share(labels_decode_p50: float | None, model_ms: float) -> float | None:
    """Decoding's share of a replica's per-frame work (decode / (decode + model))."""
    if labels_decode_p50 is None or labels_decode_p50 + model_ms <= 0:
        return None
    return round(labels_decode_p50 / (labels_decode_p50 + model_ms), 3)


def bench_pipeline_camera(
    settings: FramecastSettings, artifact: Path | None, console: Console, *, frame_size: str,
    quick: bool, cameras: int = 8, fps: float = 15.0,
) -> dict[str, Any]:
    """Camera frames (RGB JPEG, WxH[,WxH...], pre-encoded) through Kafka -> Serve -> Kafka
    with an RGB model: p50/p99 at ``cameras`` x ``fps`` offered, flat-out frames/s, and the
    decode share, per frame size."""
    from cluster.bench.camera import parse_frame_sizes
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown

    sizes = parse_frame_sizes(frame_size)
    model = rgb_artifact(settings, artifact, log=lambda line: console.print(line))
    bootstrap = stack.kafka_bootstrap(settings)
    seconds = 6 if quick else 20
    flat = 400 if quick else 4000
    model_ms = model_ms_per_frame(model)
    results: dict[str, Any] = {"machine": describe(), "artifact": str(model),
                               "model_ms_per_frame": model_ms, "cameras": cameras,
                               "fps_per_camera": fps, "sizes": []}
    console.print(f"  {model}: model {model_ms['p50_ms']} ms/frame at batch "
                  f"{model_ms['batch']} (one thread)", highlight=False)
    serve_settings = settings.serve.model_copy(
        update={"num_cpus": 1.0, "min_replicas": 1, "max_replicas": 1})
    with stack.ray_connection(settings):
        deploy(model, serve_settings, address=None, namespace=settings.ray.namespace)
        settings = settings.model_copy(update={"serve": serve_settings})
        for width, height in sizes:
            size = (width, height)
            warm = _pipeline_run(settings, bootstrap, cameras=cameras, fps=fps,
                                 per_camera=int(fps * (3 if quick else 8)), batch=1,
                                 classifier="framecast", frame_size=size)
            offered = _pipeline_run(settings, bootstrap, cameras=cameras, fps=fps,
                                    per_camera=int(fps * seconds), batch=1,
                                    classifier="framecast", frame_size=size)
            flat_run = _pipeline_run(settings, bootstrap, cameras=4, fps=0,
                                     per_camera=flat // 4, batch=16, classifier="framecast",
                                     frame_size=size)
            decode_p50 = offered["p50_parts_ms"].get("decode")
            row = {
                "frame_size": f"{width}x{height}",
                "jpeg_bytes_mean": offered["producer"].get("jpeg_bytes_mean"),
                "clip": offered["producer"].get("clip"),
                "warmup_p99_ms": warm["p99_ms"],
                "offered": offered,
                "flat_out": flat_run,
                "flat_out_fps": flat_run["sustained_fps"],
                "offered_p50_ms": offered["p50_ms"],
                "offered_p99_ms": offered["p99_ms"],
                "decode_p50_ms": decode_p50,
                "flat_out_decode_p50_ms": flat_run["p50_parts_ms"].get("decode"),
                "decode_share": decode_share(decode_p50, model_ms["p50_ms"]),
            }
            results["sizes"].append(row)
            console.print(
                f"  {row['frame_size']}: {cameras}x{fps:g} fps offered p50 "
                f"{row['offered_p50_ms']} ms, p99 {row['offered_p99_ms']} ms; flat out "
                f"{row['flat_out_fps']} frames/s; decode p50 {decode_p50} ms/frame "
                f"(share {row['decode_share']})", highlight=False)
        serve_shutdown(serve_settings.app_name, address=None, namespace=settings.ray.namespace)
    return results
