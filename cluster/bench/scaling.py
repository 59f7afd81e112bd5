"""`framecast bench scaling`: pipeline throughput and latency against the number of Serve
replicas and of classifier processes, measured on the machine at hand.

Every configuration (R replicas x P classifier processes in one consumer group) gets two runs
on fresh topics: flat out (the producer as fast as it goes, 64 frames per message) for the
sustained frames/s, and a fixed offered load (cameras x fps, one frame per message) for the
latency percentiles. The classifiers are real ``framecast stream run`` processes, as they
would be deployed; the producer is ``framecast produce`` in a process of its own.

From the measured per-replica rate the report extrapolates, on paper, the replicas a target
rate needs on a cluster (the plan in docs/BENCHMARKS.md) — labelled as arithmetic, not as a
measurement.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster import stack
from cluster.bench.runs import drop_topics, fresh_topics, label_summary, read_labels
from cluster.cameras import produce_in_subprocess
from cluster.settings import FramecastSettings
from jobs.machine import describe
from streams.topics import topic_names

PARTITIONS = 4  # enough partitions for every classifier count measured here
APP = "bench-scaling"


def _group_members(settings: FramecastSettings, bootstrap: str, group: str) -> int:
    """Members of a consumer group once it is Stable (0 while it is still rebalancing)."""
    from streams.client import admin_client
    from streams.exceptions import StreamsError

    try:
        with admin_client(settings.kafka, bootstrap) as admin:
            group_info = admin.describe_group(group)
    except StreamsError:  # no coordinator yet: the group (or __consumer_offsets) is being made
        return 0
    return len(group_info.members) if group_info.stable else 0


def classifier_argv(
    settings: FramecastSettings, bootstrap: str, names: dict[str, str], group: str, index: int,
    app: str = APP,
) -> list[str]:
    """`framecast stream run` number ``index`` of a bench's group, calling Serve app ``app``."""
    return [
        sys.executable, "-m", "cluster.cli", "--home", str(settings.home),
        "--bootstrap-servers", bootstrap, "stream", "run",
        "--frames", names["frames"], "--labels", names["labels"],
        "--latency", names["latency"], "--dlq", names["dlq"], "--group", group,
        "--app-name", app, "--max-batch", "512", "--max-wait-ms", "5",
        "--consumer-id", f"{group}-{index}",
    ]


def _run(
    settings: FramecastSettings,
    bootstrap: str,
    *,
    classifiers: int,
    cameras: int,
    fps: float,
    per_camera: int,
    batch: int,
    log_dir: Path,
) -> dict[str, Any]:
    """One measured run: P classifier processes, one producer, fresh topics."""
    names = topic_names(fresh_topics(settings, bootstrap, partitions=PARTITIONS))
    group = f"scaling-{names['frames']}"
    total = cameras * per_camera
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for index in range(classifiers):
            log_path = log_dir / f"{names['frames']}-{index}.log"
            with log_path.open("wb") as log:
                child = subprocess.Popen(
                    classifier_argv(settings, bootstrap, names, group, index),
                    stdout=subprocess.PIPE, stderr=log,
                )
            processes.append((child, log_path))
        # Measure the pipeline, not its start-up: produce once every member owns partitions.
        deadline = time.monotonic() + 240
        while _group_members(settings, bootstrap, group) < classifiers:
            failed = [p for p, _ in processes if p.poll() is not None]
            if failed or time.monotonic() > deadline:
                tail = processes[0][1].read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the classifiers did not all join {group}: {tail}")
            time.sleep(0.5)
        produced = produce_in_subprocess(
            settings, bootstrap, names["frames"], cameras=cameras, fps=fps,
            per_camera=per_camera, batch=batch,
        )
        # Every label read back, then each member is told to stop (SIGTERM: drain, commit,
        # print its totals). No idle exit: a member that joined first must not leave while
        # the others are still joining.
        labels = read_labels(settings, bootstrap, names["labels"], total, timeout_s=600)
        totals: list[dict[str, Any]] = []
        for child, _ in processes:
            child.send_signal(signal.SIGTERM)
        for child, log_path in processes:
            out, _ = child.communicate(timeout=120)
            if child.returncode != 0:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"a classifier failed ({child.returncode}): {tail}")
            totals.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for child, _ in processes:
            if child.poll() is None:
                child.kill()
                child.wait(30)
        drop_topics(settings, bootstrap, names)
    return {
        "offered_fps": cameras * fps if fps else None,
        "frames": total,
        "labels": len(labels),
        "produce_fps": produced.get("fps"),
        **label_summary(labels),
        "labelled_per_classifier": [t.get("labelled", 0) for t in totals],
    }


def bench_scaling(
    settings: FramecastSettings,
    artifact: Path,
    console: Console,
    *,
    quick: bool,
    replicas: list[int] | None = None,
    classifiers: list[int] | None = None,
) -> dict[str, Any]:
    """Flat-out frames/s and latency at a fixed offered load, per (replicas, classifiers)."""
    import ray

    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown

    replica_counts = replicas or [1, 2]
    classifier_counts = classifiers or [1, 2]
    bootstrap = stack.kafka_bootstrap(settings)
    flat_frames = 12000 if quick else 60000  # as bench pipeline: a few seconds flat out
    cameras, fps, seconds = (8, 30.0, 6) if quick else (16, 30.0, 15)
    log_dir = settings.home / "reports" / "bench" / "scaling-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": describe(), "artifact": str(artifact), "offered_load":
        {"cameras": cameras, "fps_per_camera": fps, "seconds": seconds}, "runs": [],
    }
    with stack.ray_connection(settings):
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        results["ray_cpus"] = cpus
        for count in replica_counts:
            # One CPU per replica where the cluster has them (LiteRT threads = replica CPUs).
            per_replica = min(1.0, cpus / count)
            serve_settings = settings.serve.model_copy(update={
                "app_name": APP, "route_prefix": f"/{APP}", "num_cpus": per_replica,
                "min_replicas": count, "max_replicas": count,
            })
            deploy(artifact, serve_settings, address=None, namespace=settings.ray.namespace)
            try:
                for members in classifier_counts:
                    flat = _run(
                        settings, bootstrap, classifiers=members, cameras=4, fps=0,
                        per_camera=flat_frames // 4, batch=64, log_dir=log_dir,
                    )
                    loaded = _run(
                        settings, bootstrap, classifiers=members, cameras=cameras, fps=fps,
                        per_camera=int(fps * seconds), batch=1, log_dir=log_dir,
                    )
                    row = {
                        "replicas": count, "cpus_per_replica": per_replica,
                        "classifiers": members, "flat_out": flat, "offered": loaded,
                    }
                    results["runs"].append(row)
                    console.print(
                        f"  {count} replica(s) x {members} classifier(s): flat out "
                        f"{flat['sustained_fps']} frames/s; at {loaded['offered_fps']:g} "
                        f"frames/s offered p50 {loaded['p50_ms']} ms, p99 {loaded['p99_ms']} ms",
                        highlight=False,
                    )
            finally:
                serve_shutdown(APP, address=None, namespace=settings.ray.namespace)
    results["extrapolation"] = extrapolate(results["runs"])
    return results


def extrapolate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Arithmetic from the measured runs: frames/s per replica, replicas per target rate."""
    best = max(runs, key=lambda r: r["flat_out"]["sustained_fps"] or 0.0)
    one = [r for r in runs if r["replicas"] == 1]
    per_replica = max((r["flat_out"]["sustained_fps"] or 0.0) for r in one) if one else 0.0
    targets = (1_000, 5_000, 30_000, 100_000)
    return {
        "best": {k: best[k] for k in ("replicas", "classifiers")}
        | {"sustained_fps": best["flat_out"]["sustained_fps"]},
        "per_replica_fps": per_replica,
        "replicas_needed": {
            str(t): (int(-(-t // per_replica)) if per_replica else None) for t in targets
        },
    }

