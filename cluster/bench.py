"""`framecast bench serve|pipeline`: measured on this machine, against baselines in the same run.

- serve: direct in-process LiteRT inference vs the same model behind Ray Serve (handle calls
  by batch size and concurrency, and single images over HTTP through dynamic batching);
  the ratio is the Serve overhead.
- pipeline: the whole Kafka -> Serve -> Kafka path at several offered loads (cameras x fps)
  and flat out, next to a naive baseline - one consumer calling Keras float ``predict`` per
  frame, as per-message ML-on-Kafka systems do.
Results: ``OUT/bench-<what>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import io
import json
import os
import platform
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cluster import stack
from cluster.cameras import produce_in_subprocess
from cluster.settings import FramecastSettings


def machine() -> dict[str, Any]:
    """The machine line: CPU model, cores, ISA flags that matter for int8 inference."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": [f for f in wanted if f in flags],
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _timed_loop(
    call: Any, frames_per_call: int, seconds: float, concurrency: int = 1
) -> dict[str, Any]:
    """Run call() from `concurrency` threads for `seconds`; frames/s and per-call latency."""
    latencies: list[float] = []
    count = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            call()
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                count[0] += frames_per_call

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "fps": round(count[0] / wall, 1),
        "calls": len(latencies),
        "p50_ms": _pct(latencies, 50),
        "p99_ms": _pct(latencies, 99),
    }


# -- serve ----------------------------------------------------------------------------------


def bench_serve(
    settings: FramecastSettings, artifact: Path, console: Console, *, quick: bool
) -> dict[str, Any]:
    """Direct LiteRT vs Serve handle vs HTTP, by batch size and concurrency."""
    import httpx
    from PIL import Image

    from serving.artifacts import load_artifact
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown
    from serving.frames import FrameRecord
    from serving.idx import load_fashion_mnist
    from serving.runtimes import LiteRTRuntime

    seconds = 2.0 if quick else 6.0
    batches = [1, 8, 64, 256]
    images, _ = load_fashion_mnist("test", limit=256)
    loaded = load_artifact(artifact)
    assert loaded.tflite_path is not None  # noqa: S101 - load_artifact listed it
    direct = LiteRTRuntime(loaded.tflite_path, num_threads=1)
    floats = images[:, :, :, None].astype(np.float32) / 255
    results: dict[str, Any] = {
        "machine": machine(),
        "artifact": str(artifact),
        "direct": {},
        "handle": {},
        "http": {},
    }
    for b in batches:
        results["direct"][b] = _timed_loop(lambda b=b: direct.predict(floats[:b]), b, seconds)
        console.print(f"  direct LiteRT batch {b}: {results['direct'][b]['fps']:,.0f} frames/s")
    frames = [
        FrameRecord(
            stream_id="bench",
            frame_index=i,
            captured_at_ns=0,
            encoding="raw",
            height=28,
            width=28,
            channels=1,
            data=images[i].tobytes(),
        )
        for i in range(256)
    ]
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    png = buffer.getvalue()
    serve_settings = settings.serve.model_copy(
        update={
            "num_cpus": 1.0,
            "min_replicas": 1,
            "max_replicas": 1,
            "max_ongoing_requests": 16,
            "max_queued_requests": 256,
        }
    )
    with stack.ray_connection(settings):
        from ray import serve

        deploy(artifact, serve_settings, address=None, namespace=settings.ray.namespace)
        handle = serve.get_app_handle(serve_settings.app_name)
        handle.classify_frames.remote(frames[:1]).result()
        for b in batches:
            for concurrency in (1, 4):
                key = f"{b}x{concurrency}"
                results["handle"][key] = _timed_loop(
                    lambda b=b: handle.classify_frames.remote(frames[:b]).result(),
                    b,
                    seconds,
                    concurrency,
                )
                console.print(
                    f"  Serve handle batch {b} x{concurrency}: "
                    f"{results['handle'][key]['fps']:,.0f} frames/s"
                )
        url = serve_settings.http_url + serve_settings.route_prefix.rstrip("/") + "/classify"
        for concurrency in (1, 8):
            client = httpx.Client(timeout=60)
            results["http"][concurrency] = _timed_loop(
                lambda c=client: c.post(
                    url, content=png, headers={"content-type": "image/png"}
                ).raise_for_status(),
                1,
                seconds,
                concurrency,
            )
            client.close()
            console.print(
                f"  HTTP single PNG x{concurrency}: "
                f"{results['http'][concurrency]['fps']:,.0f} frames/s"
            )
        serve_shutdown(serve_settings.app_name, address=None, namespace=settings.ray.namespace)
    results["overhead"] = {
        b: round(results["direct"][b]["fps"] / max(results["handle"][f"{b}x4"]["fps"], 1e-9), 2)
        for b in batches
    }
    return results


# -- pipeline -------------------------------------------------------------------------------


def _fresh_topics(settings: FramecastSettings, bootstrap: str, partitions: int) -> dict[str, str]:
    from streams.client import admin_client
    from streams.topics import TopicSpec, ensure_topics

    tag = uuid.uuid4().hex[:8]
    names = {k: f"bench.{tag}.{k}" for k in ("frames", "labels", "latency", "dlq")}
    with admin_client(settings.kafka, bootstrap) as admin:
        ensure_topics(
            admin,
            [
                TopicSpec(name=names["frames"], partitions=partitions),
                TopicSpec(name=names["labels"], partitions=partitions),
                TopicSpec(name=names["latency"]),
                TopicSpec(name=names["dlq"]),
            ],
        )
    return names


def _drop_topics(settings: FramecastSettings, bootstrap: str, names: dict[str, str]) -> None:
    from streams.client import admin_client

    with admin_client(settings.kafka, bootstrap) as admin:
        admin.delete_topics(list(names.values()))


def _read_labels(
    settings: FramecastSettings, bootstrap: str, topic: str, expected: int, timeout_s: float
) -> list[dict[str, Any]]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        **settings.kafka.client_config(bootstrap),
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
    )
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        out += [json.loads(m.value) for m in consumer]
    consumer.close()
    return out


def label_summary(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Sustained frames/s and end-to-end percentiles of one run's labels, and where the time
    goes (p50 of each part of the labels' timings, ms)."""
    ok = [r for r in labels if r.get("status", "ok") == "ok"]
    e2e = [r["timings_ms"]["end_to_end"] for r in ok]
    # From the first frame's capture to the last frame's label: the pipeline's own wall time.
    span = (
        (max(r["labeled_at_ns"] for r in labels) - min(r["captured_at_ns"] for r in labels)) / 1e9
        if labels else float("nan")
    )
    return {
        "sustained_fps": round(len(labels) / span, 1) if span and span > 0 else None,
        "p50_ms": _pct(e2e, 50),
        "p95_ms": _pct(e2e, 95),
        "p99_ms": _pct(e2e, 99),
        "max_ms": round(max(e2e), 3) if e2e else None,
        "p50_parts_ms": {
            part: _pct([r["timings_ms"][part] for r in ok if part in r["timings_ms"]], 50)
            for part in ("broker", "queue", "inference")
        },
    }


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
) -> dict[str, Any]:
    from streams.classifier import ClassifierConfig, StreamClassifier
    from streams.serve_client import serve_classify_fn

    names = _fresh_topics(settings, bootstrap, partitions=4)
    total = cameras * per_camera
    try:
        outcome: dict[str, Any] = {}
        if classifier == "framecast":
            classify, retriable = serve_classify_fn(
                settings.serve.app_name, settings.serve.handle_transport
            )
            config = ClassifierConfig(
                frames_topic=names["frames"],
                labels_topic=names["labels"],
                latency_topic=names["latency"],
                dlq_topic=names["dlq"],
                group=f"bench-{names['frames']}",
                max_batch_wait_ms=max_wait_ms,
                max_in_flight=in_flight,
                max_batch_frames=512,
                idle_exit_s=60.0,  # a safety net: max_frames ends the run
                max_frames=total,
            )
            classify([]).result(timeout_s=60)  # warm the handle before the clock starts
            runner = StreamClassifier(settings.kafka, bootstrap, config, classify, retriable)
            worker = threading.Thread(target=lambda: outcome.update(runner.run()), daemon=True)
            assigned = lambda: bool(runner.assignment())  # noqa: E731
        else:
            ready = threading.Event()
            worker = threading.Thread(
                target=lambda: outcome.update(
                    _naive_baseline(settings, bootstrap, names, total, ready)),
                daemon=True,
            )
            assigned = ready.is_set
        worker.start()
        # Measure the pipeline, not its start-up: produce once the consumer owns partitions.
        deadline = time.monotonic() + 120
        while not assigned() and time.monotonic() < deadline:
            time.sleep(0.1)
        # The cameras are another process, as they would be: the producer does not share
        # this process's interpreter lock with the classifier.
        produced = produce_in_subprocess(
            settings, bootstrap, names["frames"], cameras=cameras, fps=fps,
            per_camera=per_camera, batch=batch, linger_ms=linger_ms,
        )
        worker.join(timeout=600)
        if classifier == "framecast":
            classify.close()
        labels = _read_labels(settings, bootstrap, names["labels"], total, timeout_s=60)
    finally:
        _drop_topics(settings, bootstrap, names)
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
    ready: threading.Event,
) -> dict[str, Any]:
    """One consumer, Keras float predict() per frame, one label message per frame."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras
    from kafka import KafkaConsumer, KafkaProducer

    from serving.frames import decode_frames
    from streams.labels import encode_label, label_record

    artifact = settings_artifact(settings)
    loaded = tf.saved_model.load(str(artifact / "saved_model"))  # kept: it owns the variables
    signature = loaded.signatures["serving_default"]
    (input_name,) = signature.structured_input_signature[1].keys()
    (output_name,) = signature.structured_outputs.keys()

    class SavedModelAsKeras(keras.Model):
        def call(self, images: Any) -> Any:
            return signature(**{input_name: images})[output_name]

    model = SavedModelAsKeras()
    model.saved_model = loaded
    client = settings.kafka.client_config(bootstrap)
    consumer = KafkaConsumer(
        names["frames"],
        **client,
        group_id=f"naive-{names['frames']}",
        auto_offset_reset="earliest",
        enable_auto_commit=True,
    )
    producer = KafkaProducer(**client, acks="all")
    model.predict(np.zeros((1, 28, 28, 1), np.float32), verbose=0)  # build before the clock
    while not consumer.assignment():
        consumer.poll(timeout_ms=200)
    ready.set()
    done = 0
    deadline = time.monotonic() + 600
    while done < total and time.monotonic() < deadline:
        for tp_messages in consumer.poll(timeout_ms=500).values():
            for message in tp_messages:
                for row, frame in enumerate(decode_frames(message.value)):
                    pixels = np.frombuffer(frame.data, np.uint8).reshape(1, 28, 28, 1) / 255.0
                    probs = model.predict(pixels.astype(np.float32), verbose=0)[0]
                    class_id = int(np.argmax(probs))
                    labeled = time.time_ns()
                    record = label_record(
                        stream_id=frame.stream_id,
                        frame_index=frame.frame_index,
                        topic=message.topic,
                        partition=message.partition,
                        offset=message.offset,
                        row=row,
                        result={
                            "class_id": class_id,
                            "label": str(class_id),
                            "score": float(probs[class_id]),
                            "model": {"name": "naive", "version": "keras-float", "sha256": None},
                        },
                        captured_at_ns=frame.captured_at_ns,
                        labeled_at_ns=labeled,
                        timings_ms={"end_to_end": (labeled - frame.captured_at_ns) / 1e6},
                        ground_truth=frame.label,
                    )
                    producer.send(
                        names["labels"], key=frame.stream_id.encode(), value=encode_label(record)
                    )
                    done += 1
    producer.flush()
    producer.close()
    consumer.close()
    return {"labelled": done}


_ARTIFACT: dict[str, Path] = {}


def settings_artifact(settings: FramecastSettings) -> Path:
    """The artifact the pipeline bench serves (set by bench_pipeline)."""
    return _ARTIFACT["path"]


def bench_pipeline(
    settings: FramecastSettings, artifact: Path, console: Console, *, quick: bool
) -> dict[str, Any]:
    """Sustained frames/s and latency at several offered loads, vs the naive baseline."""
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown

    _ARTIFACT["path"] = artifact
    bootstrap = stack.kafka_bootstrap(settings)
    seconds = 8 if quick else 20
    loads = [(4, 30.0), (16, 30.0), (33, 30.0)] if not quick else [(4, 30.0), (33, 30.0)]
    results: dict[str, Any] = {"machine": machine(), "artifact": str(artifact), "runs": []}
    serve_settings = settings.serve.model_copy(
        update={"num_cpus": 1.0, "min_replicas": 1, "max_replicas": 1}
    )
    with stack.ray_connection(settings):
        deploy(artifact, serve_settings, address=None, namespace=settings.ray.namespace)
        settings = settings.model_copy(update={"serve": serve_settings})
        # Not measured: the broker's JVM compiles its hot paths in the first seconds of load
        # (on a freshly started stack the first 20 s run had p99 225 ms, the next ones 52, 43
        # and 26 ms), and Serve's router, the replica and the clients warm up too.
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
        )
        results["runs"].append(run)
    console.print(f"  naive Keras predict per frame, flat out: {run['sustained_fps']} frames/s")
    best = max((r["sustained_fps"] or 0) for r in results["runs"] if r["classifier"] == "framecast")
    results["ratio_vs_naive"] = round(best / max(run["sustained_fps"] or 1e-9, 1e-9), 1)
    return results


# -- output -----------------------------------------------------------------------------------


def write_outputs(out_dir: Path, what: str, results: dict[str, Any]) -> list[Path]:
    """JSON, Markdown and a PNG plot of one bench section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"bench-{what}.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    m = results["machine"]
    lines = [
        f"# framecast bench {what}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['flags']) or '-'}; "
        f"{m['date']}.",
        "",
    ]
    if results.get("artifact"):
        lines += [f"Served artifact: `{results['artifact']}`.", ""]
    if results.get("warmup"):
        w = results["warmup"]
        lines += [
            f"First an unmeasured warm-up: {w['frames']} frames at {w['offered_fps']:g} "
            f"frames/s offered (its p99: {w['p99_ms']} ms).",
            "",
        ]
    figure, axis = plt.subplots(figsize=(7, 4))
    if what == "serve":
        lines += [
            "| path | batch | concurrency | frames/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for b, r in results["direct"].items():
            lines.append(
                f"| direct LiteRT | {b} | 1 | {r['fps']:,.0f} | {r['p50_ms']} | {r['p99_ms']} |"
            )
        for key, r in results["handle"].items():
            b, c = key.split("x")
            lines.append(
                f"| Serve handle | {b} | {c} | {r['fps']:,.0f} | {r['p50_ms']} | {r['p99_ms']} |"
            )
        for c, r in results["http"].items():
            lines.append(
                f"| HTTP PNG | 1 | {c} | {r['fps']:,.0f} | {r['p50_ms']} | {r['p99_ms']} |"
            )
        lines += [
            "",
            "Serve overhead (direct frames/s / Serve handle frames/s at 4 concurrent "
            "calls): " + ", ".join(f"batch {b}: {v}x" for b, v in results["overhead"].items()),
        ]
        sizes = [int(b) for b in results["direct"]]
        axis.plot(
            sizes, [r["fps"] for r in results["direct"].values()], "o-", label="direct LiteRT"
        )
        for c in (1, 4):
            axis.plot(
                sizes,
                [results["handle"][f"{b}x{c}"]["fps"] for b in sizes],
                "s-",
                label=f"Serve handle x{c}",
            )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("frames per call")
        axis.set_ylabel("frames/s")
    else:
        lines += [
            "| classifier | offered | frames | sustained frames/s | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["runs"]:
            offered = (
                f"{r['cameras']}x{r['fps_per_camera']:g} fps" if r["fps_per_camera"] else "flat out"
            )
            lines.append(
                f"| {r['classifier']} | {offered} | {r['labels']}/{r['frames']} | "
                f"{r['sustained_fps']} | {r['p50_ms']} | {r['p95_ms']} | "
                f"{r['p99_ms']} |"
            )
        lines += [
            "",
            f"framecast's best sustained rate / naive baseline: {results['ratio_vs_naive']}x",
        ]
        runs = [r for r in results["runs"] if r["classifier"] == "framecast" and r["offered_fps"]]
        axis.plot(
            [r["offered_fps"] for r in runs],
            [r["p99_ms"] for r in runs],
            "o-",
            label="p99 end-to-end",
        )
        axis.plot(
            [r["offered_fps"] for r in runs],
            [r["p50_ms"] for r in runs],
            "s-",
            label="p50 end-to-end",
        )
        axis.set_xlabel("offered load (frames/s)")
        axis.set_ylabel("latency (ms)")
    axis.legend()
    axis.set_title(f"framecast bench {what}")
    figure.tight_layout()
    png_path = out_dir / f"bench-{what}.png"
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    md_path = out_dir / f"bench-{what}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [json_path, md_path, png_path]
