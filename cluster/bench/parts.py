"""Where a fixed load's latency goes: the labels' timing parts, p50 and p99, run by run.

``python -m cluster.bench.parts`` runs the stream classifier (Serve, the running stack) at one
offered load (cameras x fps) on fresh topics, like ``framecast bench pipeline``, and prints
for its labels the p50 / p90 / p99 of each part of ``timings_ms`` - broker (Kafka timestamp to
consumed), queue (consumed to sent to Serve), decode, inference - and of the rest (the Serve
round trip and labelling: end-to-end minus the parts). Settings can differ from the shipped
ones (``--max-wait-ms``, ``--in-flight``, ``--linger-ms``) to compare choices on the same
stack; ``--runs`` repeats it. The figures in docs/BENCHMARKS.md's "Figures behind choices in
the code" came from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

PARTS = ("broker", "queue", "decode", "inference")


def parts_table(labels: list[dict[str, Any]], skip_s: float = 4.0) -> dict[str, Any]:
    """p50/p90/p99 (ms) of end-to-end, each part and the rest, over the labelled frames
    whose label came ``skip_s`` or more after the first (the run's start-up left out)."""
    ok = [r for r in labels if r.get("status", "ok") == "ok"]
    if not ok:
        return {"frames": 0}
    first = min(r["labeled_at_ns"] for r in ok)
    kept = [r for r in ok if r["labeled_at_ns"] - first >= skip_s * 1e9] or ok
    columns = {k: np.array([r["timings_ms"].get(k, 0.0) for r in kept]) for k in PARTS}
    columns["end_to_end"] = np.array([r["timings_ms"]["end_to_end"] for r in kept])
    columns["rest"] = columns["end_to_end"] - sum(columns[k] for k in PARTS)
    return {
        "frames": len(kept),
        **{
            name: {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 90, 99)}
            for name, values in columns.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.parts", description=__doc__)
    parser.add_argument("--frame-size", default="640x480",
                        help="RGB JPEG camera frames WxH, or 28 for Fashion-MNIST raw frames")
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--max-wait-ms", type=int, default=None)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--linger-ms", type=int, default=None)
    parser.add_argument("--deploy", type=Path, default=None,
                        help="deploy this artifact first (one replica, 1 CPU)")
    args = parser.parse_args(argv)

    from cluster import stack
    from cluster.bench import pipeline
    from cluster.bench.camera import parse_frame_size
    from cluster.kafka_security import with_stack_credentials
    from cluster.settings import load_settings
    from serving.deploy import deploy

    size = None if args.frame_size == "28" else parse_frame_size(args.frame_size)
    settings = with_stack_credentials(load_settings())
    bootstrap = stack.kafka_bootstrap(settings)
    serve = settings.serve.model_copy(
        update={"num_cpus": 1.0, "min_replicas": 1, "max_replicas": 1})
    with stack.ray_connection(settings):
        if args.deploy is not None:
            deploy(args.deploy, serve, address=None, namespace=settings.ray.namespace)
        settings = settings.model_copy(update={"serve": serve})
        options: dict[str, Any] = {
            "cameras": args.cameras, "fps": args.fps, "batch": 1, "classifier": "framecast",
            "frame_size": size, "max_wait_ms": args.max_wait_ms, "in_flight": args.in_flight,
            "linger_ms": args.linger_ms,
        }
        pipeline._pipeline_run(settings, bootstrap, per_camera=int(args.fps * 3), **options)
        for _ in range(args.runs):
            labels: list[dict[str, Any]] = []
            pipeline._pipeline_run(settings, bootstrap, per_camera=int(args.fps * args.seconds),
                                   labels_out=labels, **options)
            sys.stdout.write(json.dumps(parts_table(labels)) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
