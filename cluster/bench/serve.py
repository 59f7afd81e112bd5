"""`framecast bench serve`: direct in-process LiteRT inference vs the same model behind Ray
Serve (handle calls by batch size and concurrency, and single images over HTTP through dynamic
batching), measured on this machine in the same run; the ratio is the Serve overhead.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cluster import stack
from cluster.bench.runs import percentile
from cluster.settings import FramecastSettings
from jobs.machine import describe


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
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


def bench_serve(
    settings: FramecastSettings, artifact: Path, console: Console, *, quick: bool
) -> dict[str, Any]:
    """Direct LiteRT vs Serve handle vs HTTP, by batch size and concurrency."""
    import httpx
    from PIL import Image

    from serving.artifacts import load_artifact
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown
    from serving.fashion_mnist import load_fashion_mnist
    from serving.frames import FrameRecord
    from serving.runtimes import LiteRTRuntime

    seconds = 2.0 if quick else 6.0
    batches = [1, 8, 64, 256]
    images, _ = load_fashion_mnist("test", limit=256)
    loaded = load_artifact(artifact)
    assert loaded.tflite_path is not None  # noqa: S101 - load_artifact listed it
    direct = LiteRTRuntime(loaded.tflite_path, num_threads=1)
    floats = images[:, :, :, None].astype(np.float32) / 255
    results: dict[str, Any] = {
        "machine": describe(),
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
