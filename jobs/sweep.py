"""``framecast sweep``: sparsity x quantization on one model and dataset, with a Pareto report.

The model is trained once per sparsity (0, 0.5, 0.75, 0.9 polynomial, 2:4); every
quantization (none = LiteRT float32, float16, dynamic, int8) is exported from that one
training, and QAT int8 gets its own quantization-aware fine-tune of it (pruning-preserving
when pruned). Every point is measured the same way: LiteRT, batch 1, one thread, on the
same test images. The Pareto front is over accuracy (higher), p50 latency and compressed
size (lower); the operating point is the fastest front point within ``max_accuracy_drop``
percentage points of the most accurate point.
"""

from __future__ import annotations

import gzip
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.machine import describe, provenance, write_report

SWEEP_SPARSITIES = ("0", "0.5", "0.75", "0.9", "2:4")
SWEEP_QUANTS = ("none", "float16", "dynamic", "int8", "qat-int8")
CALIBRATION_SAMPLES = 500
# Objectives: (key, +1 to maximize / -1 to minimize).
OBJECTIVES: tuple[tuple[str, int], ...] = (
    ("accuracy", 1), ("latency_ms_p50", -1), ("gzip_bytes", -1))


@dataclass
class SweepOptions:
    """What to sweep and how hard to train."""

    model: str
    dataset: str = "fashion-mnist"
    epochs: int = 5
    qat_epochs: int = 1
    limit: int | None = None
    test_limit: int | None = 2000
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    latency_samples: int = 200
    max_accuracy_drop: float = 1.0  # percentage points
    sparsities: list[str] = field(default_factory=lambda: list(SWEEP_SPARSITIES))
    quants: list[str] = field(default_factory=lambda: list(SWEEP_QUANTS))

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        from jobs.names import MODEL_NAMES, validate_choice

        validate_choice("model", self.model, MODEL_NAMES)
        bad = [s for s in self.sparsities if s not in SWEEP_SPARSITIES]
        if bad or not self.sparsities:
            raise ValueError(f"--sparsities: {', '.join(bad) or 'empty'}; expected a subset of "
                             f"{', '.join(SWEEP_SPARSITIES)}")
        bad = [q for q in self.quants if q not in SWEEP_QUANTS]
        if bad or not self.quants:
            raise ValueError(f"--quants: {', '.join(bad) or 'empty'}; expected a subset of "
                             f"{', '.join(SWEEP_QUANTS)}")
        if self.epochs < 1 or self.qat_epochs < 1 or self.latency_samples < 1:
            raise ValueError("--epochs, --qat-epochs and --latency-samples must be >= 1")
        if self.max_accuracy_drop < 0:
            raise ValueError(f"--max-accuracy-drop must be >= 0, got {self.max_accuracy_drop}")


# -- the Pareto front (pure) -------------------------------------------------------------------


def dominates(a: dict[str, Any], b: dict[str, Any],
              objectives: Sequence[tuple[str, int]] = OBJECTIVES) -> bool:
    """Whether a is at least as good as b on every objective and better on one."""
    better = False
    for key, sign in objectives:
        left, right = sign * float(a[key]), sign * float(b[key])
        if left < right:
            return False
        if left > right:
            better = True
    return better


def pareto_front(points: Sequence[dict[str, Any]],
                 objectives: Sequence[tuple[str, int]] = OBJECTIVES) -> list[int]:
    """Indices of the points no other point dominates (points with an error are skipped)."""
    usable = [i for i, p in enumerate(points) if not p.get("error")]
    return [i for i in usable
            if not any(dominates(points[j], points[i], objectives) for j in usable if j != i)]


def choose_operating_point(points: Sequence[dict[str, Any]], front: Sequence[int],
                           max_accuracy_drop: float) -> int | None:
    """The fastest front point within max_accuracy_drop (points) of the best accuracy.

    Ties on latency go to the smaller model. None when there is no usable point.
    """
    if not front:
        return None
    best = max(float(points[i]["accuracy"]) for i in front)
    near = [i for i in front if 100 * (best - float(points[i]["accuracy"])) <= max_accuracy_drop
            + 1e-9]
    return min(near, key=lambda i: (float(points[i]["latency_ms_p50"]),
                                    float(points[i]["gzip_bytes"])))


# -- the sweep ---------------------------------------------------------------------------------


def _measure_point(path: Path, x_test: Any, y_test: Any, num_classes: int,
                   samples: int) -> dict[str, Any]:
    from jobs.evaluate import (
        LiteRTRunner,
        classification_metrics,
        measure_latency,
        predict_all,
    )

    runner = LiteRTRunner(path, num_threads=1)
    probabilities = predict_all(runner, x_test)
    metrics = classification_metrics(y_test, probabilities.argmax(axis=1), num_classes)
    metrics.pop("confusion_matrix")
    metrics.update(measure_latency(runner, x_test, samples=samples))
    raw = path.read_bytes()
    metrics["size_bytes"] = len(raw)
    metrics["gzip_bytes"] = len(gzip.compress(raw, compresslevel=9, mtime=0))
    return metrics


def run_sweep(options: SweepOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, export and measure every (sparsity, quantization) point; return the results."""
    from jobs.data import calibration_sample, load_dataset
    from jobs.qat import finetune_quantization_aware
    from jobs.variants import convert_litert, train_in_process

    options.validate()
    started = time.perf_counter()
    machine_before = describe()
    data = load_dataset(options.dataset, limit=options.limit, test_limit=options.test_limit,
                        seed=options.seed)
    calibration = calibration_sample(data.x_train, CALIBRATION_SAMPLES, options.seed)
    points: list[dict[str, Any]] = []
    trainings: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="framecast-sweep-") as scratch:
        for sparsity in options.sparsities:
            log(f"training {options.model} with sparsity {sparsity} "
                f"({len(data.y_train)} images, {options.epochs} epoch(s))")
            trained = train_in_process(
                options.model, data.x_train, data.y_train, len(data.classes),
                epochs=options.epochs, sparsity=sparsity, batch_size=options.batch_size,
                learning_rate=options.learning_rate, seed=options.seed)
            trainings.append({"sparsity": sparsity, "prune": trained.prune,
                              "measured_sparsity": trained.measured_sparsity,
                              "m_by_n": trained.m_by_n, "train_seconds": trained.seconds,
                              "history": trained.history})
            for quant in options.quants:
                point: dict[str, Any] = {
                    "sparsity": sparsity, "quantization": quant,
                    "measured_sparsity": round(trained.measured_sparsity, 4)}
                clock = time.perf_counter()
                try:
                    if quant == "qat-int8":
                        qat_model, _ = finetune_quantization_aware(
                            trained.model, data.x_train, data.y_train,
                            epochs=options.qat_epochs, batch_size=options.batch_size,
                            learning_rate=options.learning_rate,
                            preserve_sparsity=trained.prune != "none", seed=options.seed)
                        blob = convert_litert(qat_model, "int8", calibration)
                    else:
                        mode = "float32" if quant == "none" else quant
                        blob = convert_litert(trained.model, mode, calibration)
                    path = Path(scratch) / f"s{sparsity.replace(':', 'of')}-{quant}.tflite"
                    path.write_bytes(blob)
                    point.update(_measure_point(path, data.x_test, data.y_test,
                                                len(data.classes), options.latency_samples))
                except ValueError as error:  # e.g. tfmot cannot QAT this model
                    point["error"] = str(error)
                point["seconds"] = round(time.perf_counter() - clock, 1)
                points.append(point)
                log(_point_line(point))
    front = pareto_front(points)
    chosen = choose_operating_point(points, front, options.max_accuracy_drop)
    for index, point in enumerate(points):
        point["pareto"] = index in front
        point["chosen"] = index == chosen
    return {
        "options": asdict(options),
        "machine": machine_before,
        "loadavg_after": describe()["loadavg"],
        "train_images": len(data.y_train),
        "test_images": len(data.y_test),
        "trainings": trainings,
        "points": points,
        "pareto": front,
        "chosen": chosen,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _point_line(point: dict[str, Any]) -> str:
    if point.get("error"):
        return f"  sparsity {point['sparsity']:>4} {point['quantization']:>8}: {point['error']}"
    return (f"  sparsity {point['sparsity']:>4} {point['quantization']:>8}: "
            f"accuracy {100 * point['accuracy']:.2f} %, p50 {point['latency_ms_p50']:.3f} ms, "
            f"{point['size_bytes'] / 1024:.0f} KiB ({point['gzip_bytes'] / 1024:.0f} KiB gzip)")


# -- the report --------------------------------------------------------------------------------


def sweep_markdown(results: dict[str, Any], command: str) -> str:
    """The Pareto report as Markdown: every point, the front marked, the choice explained."""
    options = results["options"]
    points = results["points"]
    lines = [
        f"# framecast sweep: {options['model']} on {options['dataset']}",
        "",
        *provenance(command, results["machine"], results["loadavg_after"]),
        f"Trained in this process on {results['train_images']} images for {options['epochs']} "
        f"epoch(s) per sparsity (QAT: +{options['qat_epochs']} epoch(s) of quantization-aware "
        f"fine-tuning); measured on {results['test_images']} test images. Latency: LiteRT, "
        "batch 1, one thread (quantization `none` = LiteRT float32). Size: the .tflite file, "
        "and gzip -9 of it (zeros from pruning only shrink the compressed size). Whole sweep: "
        f"{results['wall_seconds']:.0f} s.",
        "",
        "| sparsity | measured | quantization | accuracy % | F1 | p50 ms | p99 ms | size KiB "
        "| gzip KiB | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if p.get("error"):
            lines.append(f"| {p['sparsity']} | {p['measured_sparsity']:.3f} | "
                         f"{p['quantization']} | error: {p['error']} | | | | | | |")
            continue
        mark = "**chosen**" if p["chosen"] else ("yes" if p["pareto"] else "")
        lines.append(
            f"| {p['sparsity']} | {p['measured_sparsity']:.3f} | {p['quantization']} "
            f"| {100 * p['accuracy']:.2f} | {p['f1_macro']:.4f} | {p['latency_ms_p50']:.3f} "
            f"| {p['latency_ms_p99']:.3f} | {p['size_bytes'] / 1024:.1f} "
            f"| {p['gzip_bytes'] / 1024:.1f} | {mark} |")
    chosen = results["chosen"]
    lines.append("")
    if chosen is None:
        lines.append("No point could be measured, so there is no operating point.")
    else:
        p = points[chosen]
        lines.append(
            f"Operating point: sparsity {p['sparsity']}, quantization {p['quantization']} - "
            f"the fastest Pareto point within {options['max_accuracy_drop']:g} accuracy "
            f"point(s) of the most accurate one ({100 * p['accuracy']:.2f} %, "
            f"p50 {p['latency_ms_p50']:.3f} ms, {p['gzip_bytes'] / 1024:.1f} KiB gzip).")
    lines += ["", "A point is on the Pareto front when no other point is at least as accurate, "
              "as fast (p50) and as small (gzip) and better on one of them - a front in three "
              "dimensions, so each 2-D panel of the plot shows points that look dominated "
              "there. Latency differences under ~25 % are within the noise of a shared "
              "2-core machine (see the load average)."]
    return "\n".join(lines) + "\n"


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """Accuracy vs latency and accuracy vs compressed size; front ringed, choice starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in results["points"] if not p.get("error")]
    quants = list(dict.fromkeys(p["quantization"] for p in points))
    markers = dict(zip(SWEEP_SPARSITIES, "osD^v", strict=True))
    colors = {q: f"C{i}" for i, q in enumerate(quants)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for axis, key, label in ((axes[0], "latency_ms_p50", "p50 latency, batch 1, 1 thread (ms)"),
                             (axes[1], "gzip_bytes", "model size, gzip (KiB)")):
        scale = 1 / 1024 if key == "gzip_bytes" else 1.0
        for p in points:
            axis.scatter(p[key] * scale, 100 * p["accuracy"], marker=markers[p["sparsity"]],
                         color=colors[p["quantization"]], s=46, alpha=0.85,
                         edgecolors="black" if p["pareto"] else "none", linewidths=1.2)
            if p["chosen"]:
                axis.scatter(p[key] * scale, 100 * p["accuracy"], marker="*", s=380,
                             facecolors="none", edgecolors="red", linewidths=1.6)
        axis.set(xlabel=label, ylabel="test accuracy %")
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[q], marker="o", linestyle="", label=q)
               for q in quants]
    handles += [plt.Line2D([], [], color="black", marker=markers[s], linestyle="",
                           markerfacecolor="none", label=f"sparsity {s}")
                for s in dict.fromkeys(p["sparsity"] for p in points)]
    handles.append(plt.Line2D([], [], color="red", marker="*", linestyle="", markersize=14,
                              markerfacecolor="none", label="operating point"))
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    options = results["options"]
    fig.suptitle(f"framecast sweep: {options['model']} on {options['dataset']} "
                 "(black edge = Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep(results: dict[str, Any], out: Path, command: str) -> list[Path]:
    """sweep.json, sweep.md and sweep.png in out."""
    return write_report(out, "sweep", results, sweep_markdown(results, command), plot_sweep)
