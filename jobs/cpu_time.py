"""int8 CPU time per image of several artifacts, side by side, on one thread.

``python -m jobs.cpu_time models/fashion_mnist_optimized OTHER [--batch 1] [--rounds 21]
[--calls 500]`` runs each artifact's ``model.tflite`` (LiteRT, XNNPACK, one thread) on zero
images of its input shape, the artifacts interleaved round by round in one process, and
prints each one's median and minimum **CPU time of the calling thread** per image, and its
ratio to the first. CPU time, not wall time: on a machine that is also training or running
tests, wall time is mostly the neighbours' (the thread's own CPU time still moves with cache
and frequency contention, so compare within one run). It is how docs/training.md ("The
optimized model") compared the candidates' batch-1 times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def cpu_time_per_image(artifacts: list[Path], batch: int = 1, rounds: int = 21,
                       calls: int = 500) -> list[dict[str, Any]]:
    """Per artifact: median and min microseconds of thread CPU time per image, and the
    median's ratio to the first artifact's."""
    from ai_edge_litert.interpreter import Interpreter

    runners = []
    for artifact in artifacts:
        interpreter = Interpreter(model_path=str(Path(artifact) / "model.tflite"),
                                  num_threads=1)
        detail = interpreter.get_input_details()[0]
        shape = [batch, *detail["shape"][1:]]
        interpreter.resize_tensor_input(detail["index"], shape)
        interpreter.allocate_tensors()
        images = np.zeros(shape, dtype=detail["dtype"])
        runners.append((interpreter, detail["index"], images))
    samples: list[list[float]] = [[] for _ in artifacts]
    for _ in range(rounds):
        for index, (interpreter, tensor, images) in enumerate(runners):
            started = time.thread_time()
            for _ in range(calls):
                interpreter.set_tensor(tensor, images)
                interpreter.invoke()
            samples[index].append((time.thread_time() - started) / (calls * batch) * 1e6)
    first = statistics.median(samples[0])
    return [{"artifact": str(artifact), "batch": batch,
             "us_per_image_median": statistics.median(times),
             "us_per_image_min": min(times),
             "vs_first": statistics.median(times) / first}
            for artifact, times in zip(artifacts, samples, strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    args = parser.parse_args(argv)
    rows = cpu_time_per_image(args.artifacts, args.batch, args.rounds, args.calls)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['artifact']}: batch {row['batch']}, "
              f"{row['us_per_image_median']:.1f} us/image (min {row['us_per_image_min']:.1f}),"
              f" {row['vs_first']:.3f}x the first")


if __name__ == "__main__":
    main()
