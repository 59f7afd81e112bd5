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
    max_wait_ms: int = 5,
    in_flight: int = 2,
    linger_ms: int = 5,
    artifact: Path | None = None,
) -> dict[str, Any]:
    """One measured run on fresh topics: the stream classifier (`classifier="framecast"`) or
    the naive baseline (`"naive"`, which loads `artifact` itself), cameras in a process of
    their own."""
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
                    "max_batch_wait_ms": max_wait_ms,
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
        produced = produce_in_subprocess(
            settings, bootstrap, names["frames"], cameras=cameras, fps=fps,
            per_camera=per_camera, batch=batch, linger_ms=linger_ms,
        )
        finish()
        labels = read_labels(settings, bootstrap, names["labels"], total, timeout_s=60)
    return {
        "classifier": classifier,
        "cameras": cameras,
        "fps_per_camera": fps,
        "offered_fps": cameras * fps if fps else None,
        "frames": total,
        "labels": len(labels),
        "produce_fps": produced.get("fps"),
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
