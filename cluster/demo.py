"""`framecast demo`: the main job, end to end, with the parts that exist.

Today that is: start the embedded stack (real Kafka broker + local Ray head), create the
topics, send Fashion-MNIST frames from several simulated cameras through the broker as
Arrow frame records, read every one back, check order and content in Ray tasks, and print
a summary. Classification joins when the serving and streaming issues land.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster import stack
from cluster.settings import FramecastSettings
from serving.idx import DatasetNotFoundError, load_fashion_mnist
from streams.frames import ARROW_CONTENT_TYPE, FrameRecord, decode_frames, encode_frames

log = logging.getLogger(__name__)


def _images(count: int, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        images, labels = load_fashion_mnist("test", data_dir, limit=count)
        source = "fashion-mnist test set"
    except DatasetNotFoundError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count)
        source = "synthetic noise (Fashion-MNIST not installed)"
    reps = -(-count // len(images))
    return np.tile(images, (reps, 1, 1))[:count], np.tile(labels, reps)[:count], source


def _verify_stream(payloads: list[bytes]) -> dict[str, Any]:
    """Decode one camera's messages and check frame order and content (runs as a Ray task)."""
    frames = [frame for payload in payloads for frame in decode_frames(payload)]
    indices = [f.frame_index for f in frames]
    digest = hashlib.sha256(b"".join(f.data for f in frames)).hexdigest()
    return {
        "frames": len(frames),
        "in_order": indices == sorted(indices),
        "unique": len(set(indices)),
        "sha256": digest,
    }


def run_demo(
    settings: FramecastSettings,
    console: Console,
    *,
    frames: int,
    cameras: int,
    fps: float,
    keep_running: bool,
) -> dict[str, Any]:
    """Run the demo and return its report (also written under HOME/reports/)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from streams.client import admin_client
    from streams.topics import apply_topic_specs, default_topic_specs

    t_start = time.monotonic()
    was_up = {
        "kafka": stack.embedded_kafka(settings).info() is not None,
        "ray": stack.local_ray_head(settings).info() is not None,
    }
    console.rule("[bold]framecast demo")
    with console.status("starting the embedded stack (Kafka broker + Ray head)..."):
        events = stack.up(settings)
    for event in events:
        took = f" in {event.seconds:.1f}s" if event.action == "started" else ""
        console.print(
            f"  [green]{event.component}[/] {event.action}{took}: {event.detail}", highlight=False
        )
    bootstrap = stack.kafka_bootstrap(settings)
    report: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "cameras": cameras,
        "fps_per_camera": fps,
    }
    try:
        with admin_client(settings.kafka, bootstrap) as admin:
            changes = apply_topic_specs(admin, default_topic_specs(settings.topics))
        console.print(
            "  topics: " + ", ".join(f"{c.name} ({c.action})" for c in changes), highlight=False
        )
        topic = settings.topics.frames
        images, labels, source = _images(frames, settings.data_dir)
        report["source"] = source
        client = settings.kafka.client_config(bootstrap)

        consumer = KafkaConsumer(
            **client,
            enable_auto_commit=False,
            consumer_timeout_ms=1000,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))
        ]
        consumer.assign(partitions)
        start_offsets = consumer.end_offsets(partitions)  # only this run's frames are read back
        for tp, offset in start_offsets.items():
            consumer.seek(tp, offset)

        producer = KafkaProducer(
            **client,
            acks="all",
            linger_ms=5,
            enable_idempotence=True,
            max_request_size=8 * 1024 * 1024,
        )
        sent_digest: dict[str, hashlib._Hash] = defaultdict(hashlib.sha256)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        received: dict[str, list[bytes]] = defaultdict(list)
        latencies_ms: list[float] = []
        state = {"got": 0}

        def consume() -> None:
            # Runs beside the producer, so the latency below is capture -> consumed.
            deadline = time.monotonic() + 120
            while state["got"] < frames and time.monotonic() < deadline:
                for message in consumer:
                    now_ns = time.time_ns()
                    received[message.key.decode()].append(message.value)
                    for frame in decode_frames(message.value):
                        latencies_ms.append((now_ns - frame.captured_at_ns) / 1e6)
                    state["got"] += 1
                    progress.advance(recv_task)
                    if state["got"] >= frames:
                        break

        with progress:
            sent_task = progress.add_task("frames sent    ", total=frames)
            recv_task = progress.add_task("frames received", total=frames)
            reader = threading.Thread(target=consume, name="demo-consumer", daemon=True)
            reader.start()
            t_produce = time.monotonic()
            interval = 1.0 / (fps * cameras) if fps > 0 else 0.0
            for i in range(frames):
                # Real-time pacing: each camera emits `fps` frames a second.
                delay = t_produce + i * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                stream_id = f"camera-{i % cameras}"
                record = FrameRecord(
                    stream_id=stream_id,
                    frame_index=i // cameras,
                    captured_at_ns=time.time_ns(),
                    encoding="raw",
                    height=28,
                    width=28,
                    channels=1,
                    data=images[i].tobytes(),
                    label=int(labels[i]),
                )
                sent_digest[stream_id].update(record.data)
                producer.send(
                    topic,
                    key=stream_id.encode(),
                    value=encode_frames([record]),
                    headers=[("content-type", ARROW_CONTENT_TYPE.encode())],
                )
                progress.advance(sent_task)
            producer.flush()
            produce_s = time.monotonic() - t_produce
            reader.join()
        got = state["got"]
        producer.close()
        consumer.close()

        ray_checks = _verify_in_ray(received, settings)
        lost = frames - got
        mismatched = [
            s
            for s, check in ray_checks["streams"].items()
            if check["sha256"] != sent_digest[s].hexdigest() or not check["in_order"]
        ]
        lat = np.array(latencies_ms) if latencies_ms else np.array([np.nan])
        report.update(
            {
                "frames_sent": frames,
                "frames_received": got,
                "lost": lost,
                "streams_mismatched": mismatched,
                "produce_fps": frames / produce_s if produce_s else None,
                "broker_latency_ms": {
                    q: float(np.percentile(lat, int(q[1:]))) for q in ("p50", "p95", "p99")
                },
                "ray": {k: v for k, v in ray_checks.items() if k != "streams"},
                "seconds": time.monotonic() - t_start,
            }
        )
    finally:
        if not keep_running:
            stack.down(settings, kafka=not was_up["kafka"], ray=not was_up["ray"])
    _print_summary(console, report)
    reports = settings.home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    console.print(f"report written to {reports / 'demo.json'}", highlight=False)
    if report["lost"] or report["streams_mismatched"]:
        raise SystemExit(1)
    return report


def _verify_in_ray(received: dict[str, list[bytes]], settings: FramecastSettings) -> dict[str, Any]:
    import ray

    with stack.ray_connection(settings) as address:
        verify = ray.remote(num_cpus=0.5)(_verify_stream)
        refs = {stream: verify.remote(payloads) for stream, payloads in received.items()}
        streams = {stream: ray.get(ref) for stream, ref in refs.items()}
        resources = ray.cluster_resources()
    return {
        "address": address,
        "cpus": resources.get("CPU"),
        "streams": streams,
        "tasks": len(refs),
    }


def _print_summary(console: Console, report: dict[str, Any]) -> None:
    table = Table(title="demo summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    lat = report.get("broker_latency_ms", {})
    rows = [
        ("frame source", report.get("source", "-")),
        ("cameras", f"{report['cameras']} at {report['fps_per_camera']:g} fps each"),
        (
            "frames sent / received",
            f"{report.get('frames_sent')} / {report.get('frames_received')}",
        ),
        ("lost", str(report.get("lost"))),
        (
            "per-camera order and content",
            "ok"
            if not report.get("streams_mismatched")
            else f"MISMATCH in {report['streams_mismatched']}",
        ),
        ("produce rate", f"{report.get('produce_fps') or 0:,.0f} frames/s"),
        ("capture -> consumed latency", ", ".join(f"{k} {v:.1f} ms" for k, v in lat.items())),
        (
            "verified in Ray",
            f"{report.get('ray', {}).get('tasks')} tasks on "
            f"{report.get('ray', {}).get('cpus')} CPUs",
        ),
        ("classification", "not yet: arrives with the serving and streaming issues (#4, #5)"),
        ("total time", f"{report.get('seconds', 0):.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
