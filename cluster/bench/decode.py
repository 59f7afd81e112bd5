"""``framecast bench decode``: a camera JPEG to the model's input, the ways a replica could.

One thread, the same frame decoded over and over (p50/p90 over ``samples`` decodes each,
the ways interleaved so that load from elsewhere falls on all of them alike; beside the wall
times, the p50 of the thread's CPU time, which time spent waiting for a core - on a machine
shared with other work - does not inflate):

- ``full``: the whole frame decoded, then resized (``decode_image`` + ``to_model_pixels``,
  what replicas did before the DCT-scaled path);
- ``draft``: libjpeg's DCT scaling through Pillow's ``draft`` (1/2, 1/4 or 1/8, the smallest
  still at least the model's input), then resized - ``serving.preprocess.image_pixels``,
  what replicas do;
- ``turbojpeg``: PyTurboJPEG on the system's libturbojpeg (its finer scales, e.g. 3/8), then
  the same resize - only when both are installed (they are not part of ``make setup``:
  docs/BENCHMARKS.md says why).

Frames are camera-like (:func:`camera_jpeg`): a smooth gradient, sensor noise and sharp
shapes, JPEG quality 85 - a flat image would decode unrealistically fast.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from serving.preprocess import DecodeLimits, decode_image, image_pixels, to_model_pixels

SIZES = ((1280, 720), (640, 480))
LIMITS = DecodeLimits()


def camera_jpeg(
    width: int, height: int, *, seed: int = 0, quality: int = 85, gray: bool = False
) -> bytes:
    """A camera-like JPEG: gradient + sensor noise (sigma 4) + 25 sharp-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack(
        [
            x / width * 200 + 30,
            y / height * 180 + 40,
            (x + y) / (width + height) * 150 + 60,
        ],
        axis=2,
    )
    pixels += rng.normal(0, 4, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(1, side // 20), max(2, side // 4)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + size, y0 + size], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + size, y0 + size // 2], fill=colour)
    if gray:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _turbojpeg_way(hwc: tuple[int, int, int]) -> Callable[[bytes], np.ndarray] | str:
    """PyTurboJPEG's decode at its smallest scale >= the model input + Pillow's resize, or
    why it cannot run here."""
    try:
        module: Any = importlib.import_module("turbojpeg")
        turbo = module.TurboJPEG()
    except Exception as error:  # not installed, or no libturbojpeg on the system
        return f"unavailable ({type(error).__name__}: {error})"
    out_h, out_w, _ = hwc
    factors = sorted(turbo.scaling_factors, key=lambda f: f[0] / f[1])

    def decode(data: bytes) -> np.ndarray:
        width, height, _, _ = turbo.decode_header(data)
        scale = next(
            (n, d)
            for n, d in [*factors, (1, 1)]
            if -(-width * n // d) >= out_w and -(-height * n // d) >= out_h
        )
        rgb = turbo.decode(data, pixel_format=module.TJPF_RGB, scaling_factor=scale)
        return np.asarray(
            Image.fromarray(rgb).resize((out_w, out_h), Image.Resampling.BILINEAR)
        )

    return decode


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
        "min_ms": round(ordered[0], 3),
    }


def bench_decode(
    samples: int = 300,
    hwc: tuple[int, int, int] = (224, 224, 3),
    sizes: tuple[tuple[int, int], ...] = SIZES,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """p50/p90/min ms per way and frame size, the JPEG's bytes, the draft path's pixel
    difference from the full path."""
    out_h, out_w, out_c = hwc
    ways: dict[str, Callable[[bytes], np.ndarray]] = {
        "full": lambda data: to_model_pixels(decode_image(data, "jpeg", LIMITS), *hwc),
        "draft": lambda data: image_pixels(data, "jpeg", LIMITS, hwc),
    }
    turbo = _turbojpeg_way(hwc)
    if isinstance(turbo, str):
        log(f"turbojpeg: {turbo}")
    elif out_c == 3:
        ways["turbojpeg"] = turbo
    results: list[dict[str, Any]] = []
    for width, height in sizes:
        data = camera_jpeg(width, height)
        times: dict[str, list[float]] = {name: [] for name in ways}
        cpu: dict[str, list[float]] = {name: [] for name in ways}
        for way in ways.values():
            way(data)  # warm up
        for _ in range(samples):
            for name, way in ways.items():
                started, started_cpu = time.perf_counter(), time.thread_time()
                way(data)
                times[name].append((time.perf_counter() - started) * 1000)
                cpu[name].append((time.thread_time() - started_cpu) * 1000)
        full = ways["full"](data).astype(np.int16)
        diff = np.abs(full - ways["draft"](data).astype(np.int16))
        row: dict[str, Any] = {
            "frame": f"{width}x{height}",
            "jpeg_bytes": len(data),
            "model_input": f"{out_w}x{out_h}x{out_c}",
            "ways": {
                name: {
                    **_percentiles(t),
                    "cpu_p50_ms": round(statistics.median(cpu[name]), 3),
                }
                for name, t in times.items()
            },
            "draft_vs_full": {"mean_abs": round(float(diff.mean()), 3), "max": int(diff.max())},
        }
        results.append(row)
        log(
            f"{row['frame']} ({len(data)} B) -> {row['model_input']}: "
            + ", ".join(
                f"{n} p50 {w['p50_ms']:.2f} ms (CPU {w['cpu_p50_ms']:.2f})"
                for n, w in row["ways"].items()
            )
        )
    return {
        "samples": samples,
        "batch": batch_preprocess(samples=max(10, samples // 3), sizes=sizes, hwc=hwc),
        "threads": 1,
        "turbojpeg": "measured" if "turbojpeg" in ways else turbo,
        "pillow": Image.__version__,
        "results": results,
    }


def batch_preprocess(
    samples: int = 100,
    batch: int = 16,
    sizes: tuple[tuple[int, int], ...] = SIZES,
    hwc: tuple[int, int, int] = (224, 224, 3),
) -> list[dict[str, Any]]:
    """A replica's batch preprocessing, per frame (thread CPU ms, p50 of ``samples``): a
    batch of ``batch`` different JPEGs decoded (the draft path), then made the int8 model's
    input the float way (``batch_input`` + quantization, what replicas did before) and the
    direct way (``PixelConverter``, what they do now; the same values)."""
    from serving.preprocess import PixelConverter, batch_input

    def quantize(floats: np.ndarray) -> np.ndarray:  # LiteRTRuntime._quantize, int8 1/255 -128
        q: np.ndarray = np.clip(np.round(floats / (1 / 255) - 128), -128, 127).astype(np.int8)
        return q

    converter = PixelConverter(np.dtype(np.int8), quantize)
    rows = []
    for width, height in sizes:
        jpegs = [camera_jpeg(width, height, seed=k) for k in range(batch)]
        pixels = [image_pixels(data, "jpeg", LIMITS, hwc) for data in jpegs]
        if not np.array_equal(quantize(batch_input(pixels)), converter.batch(pixels)):
            raise AssertionError("the direct conversion differs from the float path")
        cpu: dict[str, list[float]] = {"decode": [], "float_path": [], "direct": []}
        for _ in range(samples):  # interleaved, so that load from elsewhere falls on all
            started = time.thread_time()
            for data in jpegs:
                image_pixels(data, "jpeg", LIMITS, hwc)
            decoded = time.thread_time()
            quantize(batch_input(pixels))
            floated = time.thread_time()
            converter.batch(pixels)
            done = time.thread_time()
            for name, spent in (("decode", decoded - started), ("float_path", floated - decoded),
                                ("direct", done - floated)):
                cpu[name].append(spent * 1000 / batch)
        p50 = {name: round(statistics.median(t), 4) for name, t in cpu.items()}
        rows.append({
            "frame": f"{width}x{height}", "batch": batch, "converter": converter.kind,
            "cpu_p50_ms_per_frame": p50,
            "before_ms_per_frame": round(p50["decode"] + p50["float_path"], 3),
            "after_ms_per_frame": round(p50["decode"] + p50["direct"], 3),
        })
    return rows


def write_outputs(out_dir: Path, result: dict[str, Any], command: str) -> list[Path]:
    """bench-decode.json and bench-decode.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench-decode.json", out_dir / "bench-decode.md"
    json_path.write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    names = list(result["results"][0]["ways"]) if result["results"] else []
    lines = [
        f"`{command}` - one thread, {result['samples']} decodes per way, Pillow "
        f"{result['pillow']}; turbojpeg: {result['turbojpeg']}",
        "",
        "| frame | JPEG bytes | model input | "
        + " | ".join(f"{n} p50 / p90 / CPU p50 ms" for n in names)
        + " | draft vs full: mean / max abs diff |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in result["results"]:
        cells = [
            f"{w['p50_ms']:.2f} / {w['p90_ms']:.2f} / {w['cpu_p50_ms']:.2f}"
            for w in row["ways"].values()
        ]
        diff = row["draft_vs_full"]
        lines.append(
            f"| {row['frame']} | {row['jpeg_bytes']} | {row['model_input']} | "
            + " | ".join(cells)
            + f" | {diff['mean_abs']:.2f} / {diff['max']} |"
        )
    if result.get("batch"):
        lines += ["", "Batch preprocessing, thread CPU ms per frame (p50), into an int8 model:",
                  "", "| frame | batch | decode | float path (before) | direct (after) | "
                  "decode + before | decode + after |", "|---|---|---|---|---|---|---|"]
        for row in result["batch"]:
            p50 = row["cpu_p50_ms_per_frame"]
            lines.append(f"| {row['frame']} | {row['batch']} | {p50['decode']} | "
                         f"{p50['float_path']} | {p50['direct']} | "
                         f"{row['before_ms_per_frame']} | {row['after_ms_per_frame']} |")
    md_path.write_text("\n".join(lines) + "\n")
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> None:
    """``python -m cluster.bench.decode [--samples N] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = bench_decode(samples=args.samples)
    if args.out is not None:
        for path in write_outputs(args.out, result, "python -m cluster.bench.decode"):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
