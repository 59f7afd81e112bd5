"""``framecast bench model``: each model x each export, and the peers a user would pick instead.

For every model (baseline_cnn, mobilenet_v2, optimized_cnn) one set of float weights - the
shipped artifact's when it is that model on that dataset, else trained here briefly - is
exported every way framecast can ship it: Keras float (plain ``model.predict``), the float
SavedModel, LiteRT float32 / float16 / dynamic-range / int8, and ONNX (tf2onnx) on ONNX
Runtime. Each is measured on the same test images: accuracy, p50/p99 latency at batch 1 on
one thread, throughput at the best batch on all cores, size, and the MAC efficiency against
the CPU's peak (jobs.machine); the report is written by cluster.bench.report.

TensorFlow's thread count is fixed per process at first use, so the work runs in child
processes per model (``python -m cluster.bench.model``): ``prepare`` (training, all cores;
only for a model the artifact is not), ``run`` (export + accuracy + latency, one thread) and
``throughput`` (all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.machine import cpu_from, describe, efficiency_pct, peak_mac_rate

# The compute each export really does on a CPU: int8 kernels for full-integer and
# dynamic-range models; float16 weights are widened to float32 before the math.
EXPORT_DTYPE = {"litert-int8": "int8", "litert-dynamic": "int8"}
LITERT_MODES = {"litert-float32": "float32", "litert-float16": "float16",
                "litert-dynamic": "dynamic", "litert-int8": "int8"}
CALIBRATION_SAMPLES = 500
TRAINED_WEIGHTS, TRAINED_SOURCE = "trained.weights.h5", "trained.txt"


@dataclass
class ModelBenchOptions:
    """What bench model runs."""

    models: list[str]
    dataset: str = "fashion-mnist"
    artifact: str | None = None
    epochs: int = 2
    limit: int | None = 6000
    test_limit: int | None = 2000
    latency_samples: int = 300
    throughput_seconds: float = 0.5
    batches: tuple[int, ...] = (1, 8, 32, 128)
    seed: int = 0
    # Camera resolution (issue 16 item 8): the models at input_size x input_size x 3;
    # random_weights skips training and accuracy (latency does not depend on the weights).
    input_size: int | None = None
    random_weights: bool = False
    calibration_samples: int = CALIBRATION_SAMPLES

    @classmethod
    def quick(cls, **overrides: Any) -> ModelBenchOptions:
        """A short run: the shipped model only, fewer samples."""
        base = cls(models=["optimized_cnn"], epochs=1, limit=2000, test_limit=1000,
                   latency_samples=60, throughput_seconds=0.3, batches=(1, 32, 128))
        for key, value in overrides.items():
            setattr(base, key, value)
        return base


def model_spec(name: str) -> Any:
    """The ModelSpec of a bench model name: ``mobilenet_v2:1.0`` is MobileNetV2 at alpha 1.0."""
    from jobs.models import ModelSpec

    base, _, alpha = name.partition(":")
    return ModelSpec(base, alpha=float(alpha)) if alpha else ModelSpec(base)


def check_models(names: list[str], random_weights: bool) -> list[str]:
    """Problems with bench model names (an unknown model; an alpha where training, which
    builds the default alpha, would run)."""
    from jobs.names import MODEL_NAMES

    problems = []
    for name in names:
        base, _, alpha = name.partition(":")
        if base not in MODEL_NAMES:
            problems.append(f"unknown model {name!r} (models: {', '.join(MODEL_NAMES)})")
        elif alpha and base != "mobilenet_v2":
            problems.append(f"{name!r}: only mobilenet_v2 takes an alpha")
        elif alpha:
            try:
                float(alpha)
            except ValueError:
                problems.append(f"{name!r}: alpha {alpha!r} is not a number")
            else:
                if not random_weights:
                    problems.append(f"{name!r}: an alpha needs --random-weights (training "
                                    "here builds the default alpha 0.35)")
    return problems


@dataclass
class BenchData:
    """What the children measure on: uint8 NHWC images and their labels."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_test.shape[1:])  # type: ignore[return-value]


def camera_images(count: int, size: int, seed: int = 0) -> Any:
    """``count`` camera-like RGB images (cluster.bench.decode.camera_jpeg, decoded) of
    size x size: 16 distinct frames, repeated."""
    import io

    import numpy as np
    from PIL import Image

    from cluster.bench.decode import camera_jpeg

    distinct = [np.asarray(Image.open(io.BytesIO(camera_jpeg(size, size, seed=seed + k))))
                for k in range(min(16, count))]
    return np.stack([distinct[k % len(distinct)] for k in range(count)])


def bench_data(options: ModelBenchOptions, limit: int | None,
               test_limit: int | None) -> BenchData:
    """The dataset (at input_size when given), or camera-like images with random weights."""
    import numpy as np

    if options.random_weights:
        from serving.fashion_mnist import FASHION_MNIST_CLASSES

        size = options.input_size or 224
        train = camera_images(min(limit or 64, 64), size, options.seed)
        test = camera_images(test_limit or 64, size, options.seed + 100)
        return BenchData(train, np.zeros(len(train), np.int64), test,
                         np.zeros(len(test), np.int64), tuple(FASHION_MNIST_CLASSES))
    from jobs.data import load_dataset

    extra = {} if options.input_size is None else {"input_size": options.input_size}
    data = load_dataset(options.dataset, limit=limit, test_limit=test_limit, seed=options.seed,
                        **extra)
    return BenchData(data.x_train, data.y_train, data.x_test, data.y_test,
                     tuple(data.classes))


def camera_options(options: ModelBenchOptions, input_size: int | None,
                   random_weights: bool) -> ModelBenchOptions:
    """Options at camera resolution: ``input_size`` (default 224 with random weights), fewer
    timed calls and smaller batches (a 224x224 image costs ~60x a 28x28 one)."""
    options.input_size = input_size or 224
    options.random_weights = random_weights
    options.latency_samples = min(options.latency_samples, 50)
    options.batches = (1, 8, 32)
    options.calibration_samples = 64
    if random_weights:
        options.limit, options.test_limit = 64, 64
    return options


# -- child: export + accuracy + latency (one thread) -------------------------------------------


def _set_tf_threads(threads: int) -> None:
    from jobs.tf_env import tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def with_artifact_model(models: list[str], artifact: str) -> list[str]:
    """The default models, our optimized one being the artifact's own model (since 2026-12-02
    the shipped one is optimized_fc128, not optimized_cnn): the shipped weights are benched,
    not a brief retraining of another architecture. An unreadable artifact changes nothing."""
    from serving.artifacts import ArtifactError, read_manifest

    try:
        shipped = read_manifest(Path(artifact)).model
    except (ArtifactError, OSError):
        return models
    return [shipped if name == "optimized_cnn" else name for name in models]


def uses_artifact(model_name: str, options: ModelBenchOptions) -> bool:
    """Whether model_name's weights come from the artifact (same model, same dataset)."""
    if not options.artifact:
        return False
    from serving.artifacts import load_artifact

    manifest = load_artifact(Path(options.artifact)).manifest
    return manifest.model == model_name and manifest.training.dataset == options.dataset


def child_prepare(model_name: str, work: Path, options: ModelBenchOptions) -> dict[str, Any]:
    """Train model_name on all cores (TensorFlow's default threads); save its weights."""
    from jobs.variants import train_in_process

    data = bench_data(options, options.limit, 1)
    trained = train_in_process(model_name, data.x_train, data.y_train, len(data.classes),
                               epochs=options.epochs, seed=options.seed)
    work.mkdir(parents=True, exist_ok=True)
    trained.model.save_weights(str(work / TRAINED_WEIGHTS))
    source = (f"trained here: {options.epochs} epoch(s) on {len(data.y_train)} images "
              f"({trained.seconds:.0f} s)")
    (work / TRAINED_SOURCE).write_text(source, encoding="utf-8")
    return {"source": source}


def _source_model(model_name: str, options: ModelBenchOptions, data: Any,
                  work: Path) -> tuple[Any, str]:
    """(float Keras model, where its weights came from)."""
    from jobs.variants import restore_from_artifact, train_in_process

    if options.random_weights:
        from jobs.models import build_model
        from jobs.tf_env import keras

        keras.utils.set_random_seed(options.seed)
        return (build_model(model_spec(model_name), data.input_shape, len(data.classes)),
                "random weights (latency only: no training, no accuracy)")
    if uses_artifact(model_name, options):
        assert options.artifact is not None  # noqa: S101 - uses_artifact checked it
        model, manifest = restore_from_artifact(Path(options.artifact))
        return model, (f"artifact {options.artifact} ({manifest.name} {manifest.version}, "
                       f"{manifest.optimization.prune_schedule} pruning, measured sparsity "
                       f"{manifest.optimization.measured_sparsity:.2f})")
    if (work / TRAINED_WEIGHTS).is_file():
        from jobs.models import build_model

        model = build_model(model_spec(model_name), data.input_shape, len(data.classes))
        model.load_weights(str(work / TRAINED_WEIGHTS))
        return model, (work / TRAINED_SOURCE).read_text(encoding="utf-8")
    trained = train_in_process(model_name, data.x_train, data.y_train, len(data.classes),
                               epochs=options.epochs, seed=options.seed)
    return trained.model, (f"trained here: {options.epochs} epoch(s) on {len(data.y_train)} "
                           f"images ({trained.seconds:.0f} s)")


def export_all(model: Any, work: Path, calibration: Any) -> dict[str, str]:
    """Write every export of model under work; {export: error} for those that failed."""
    from jobs.export import save_float_saved_model
    from jobs.variants import convert_litert, convert_onnx

    errors: dict[str, str] = {}
    work.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(work / "keras.weights.h5"))
    save_float_saved_model(model, work / "saved_model")
    for export, mode in LITERT_MODES.items():
        try:
            (work / f"{export}.tflite").write_bytes(convert_litert(model, mode, calibration))
        except Exception as error:  # a failure here is a result, not a crash
            errors[export] = f"{type(error).__name__}: {error}"
    try:
        (work / "model.onnx").write_bytes(convert_onnx(model))
    except Exception as error:  # a failure here is a result, not a crash
        errors["onnxruntime"] = f"{type(error).__name__}: {error}"
    return errors


def export_path(work: Path, export: str) -> Path:
    """Where an export lives in the work directory."""
    if export == "keras":
        return work / "keras.weights.h5"
    if export == "saved_model":
        return work / "saved_model"
    if export == "onnxruntime":
        return work / "model.onnx"
    return work / f"{export}.tflite"


def open_export(work: Path, export: str, model_name: str, input_shape: tuple[int, ...],
                num_classes: int, threads: int) -> Any:
    """A runner (predict(uint8 images) -> probabilities) for one export."""
    from jobs.evaluate import LiteRTRunner, SavedModelRunner
    from jobs.variants import KerasRunner, OnnxRunner

    path = export_path(work, export)
    if export == "keras":
        from jobs.models import build_model

        model = build_model(model_spec(model_name), input_shape,  # type: ignore[arg-type]
                            num_classes)
        model.load_weights(str(path))
        return KerasRunner(model)
    if export == "saved_model":
        return SavedModelRunner(path, num_threads=threads)
    if export == "onnxruntime":
        return OnnxRunner(path, num_threads=threads)
    return LiteRTRunner(path, num_threads=threads)


def child_run(model_name: str, work: Path, options: ModelBenchOptions) -> dict[str, Any]:
    """Export model_name every way, then accuracy and batch-1 latency on one thread."""
    _set_tf_threads(1)
    from jobs.data import calibration_sample
    from jobs.evaluate import classification_metrics, measure_latency, predict_all
    from jobs.models import count_macs
    from jobs.variants import EXPORTS, directory_bytes

    data = bench_data(options, options.limit, options.test_limit)
    clock = time.perf_counter()
    model, source = _source_model(model_name, options, data, work)
    prepare_seconds = time.perf_counter() - clock
    errors = export_all(model, work, calibration_sample(
        data.x_train, min(options.calibration_samples, len(data.x_train)), options.seed))
    rows: list[dict[str, Any]] = []
    for export in EXPORTS:
        row: dict[str, Any] = {"model": model_name, "export": export}
        if export in errors:
            rows.append({**row, "error": errors[export]})
            continue
        import gzip

        raw = directory_bytes(export_path(work, export))
        row.update(size_bytes=len(raw), gzip_bytes=len(gzip.compress(raw, 9, mtime=0)))
        try:
            runner = open_export(work, export, model_name, data.input_shape,
                                 len(data.classes), threads=1)
            if not options.random_weights:
                probabilities = predict_all(runner, data.x_test)
                metrics = classification_metrics(data.y_test, probabilities.argmax(axis=1),
                                                 len(data.classes))
                metrics.pop("confusion_matrix")
                row.update(metrics)
            row.update(measure_latency(runner, data.x_test, samples=options.latency_samples))
        except Exception as error:  # a failure here is a result, not a crash
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
    return {"model": model_name, "source": source, "macs": count_macs(model),
            "params": int(model.count_params()), "prepare_seconds": prepare_seconds,
            "input_shape": list(data.input_shape), "num_classes": len(data.classes),
            "test_images": len(data.y_test), "rows": rows}


def child_throughput(model_name: str, work: Path, options: ModelBenchOptions,
                     input_shape: tuple[int, ...], num_classes: int,
                     exports: list[str]) -> dict[str, Any]:
    """Throughput at the best batch, all cores, for each export that ran."""
    threads = os.cpu_count() or 1
    _set_tf_threads(threads)
    from jobs.evaluate import measure_throughput

    data = bench_data(options, 1, max(options.batches))
    out: dict[str, Any] = {}
    for export in exports:
        try:
            runner = open_export(work, export, model_name, input_shape, num_classes, threads)
            out[export] = measure_throughput(runner, data.x_test, batches=options.batches,
                                             min_seconds=options.throughput_seconds)
            out[export]["throughput_threads"] = threads
        except Exception as error:  # a failure here is a result, not a crash
            out[export] = {"error": f"{type(error).__name__}: {error}"}
    return out


# -- parent --------------------------------------------------------------------------------------


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "cluster.bench.model", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def add_efficiency(row: dict[str, Any], macs: int, cpu_info: dict[str, Any],
                   measured: dict[str, Any] | None = None) -> None:
    """Latency and throughput efficiency (% of peak MAC/s) of one measured row, in place:
    against the peak computed from /proc/cpuinfo and, when given, the measured one
    (cluster.bench.peak; ``*_measured_pct``, throughput per batch size too)."""
    cpu = cpu_from(cpu_info)
    if not cpu.mhz or row.get("error"):
        return
    dtype = EXPORT_DTYPE.get(row["export"], "float32")
    peak = (measured or {}).get("int8_gmacs_1core" if dtype == "int8" else "fp32_gmacs_1core")
    if peak:
        row["peak_measured_1core_gmacs"] = peak
        if row.get("latency_ms_p50"):
            row["efficiency_latency_measured_pct"] = efficiency_pct(
                macs, 1000 / row["latency_ms_p50"], peak * 1e9)
        threads = int(row.get("throughput_threads") or 1)
        row["efficiency_by_batch_measured_pct"] = {
            batch: efficiency_pct(macs, rate, peak * 1e9 * threads)
            for batch, rate in (row.get("throughput_by_batch") or {}).items()}
    one, one_how = peak_mac_rate(cpu, dtype, 1)
    row["compute_dtype"] = dtype
    row["peak_1core_gmacs"] = one / 1e9
    row["peak_formula"] = one_how
    if row.get("latency_ms_p50"):
        row["efficiency_latency_pct"] = efficiency_pct(macs, 1000 / row["latency_ms_p50"], one)
    if row.get("throughput_ips"):
        threads = int(row.get("throughput_threads") or 1)
        peak, _ = peak_mac_rate(cpu, dtype, threads)
        row["efficiency_throughput_pct"] = efficiency_pct(macs, row["throughput_ips"], peak)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Who wins where, and the headline ratios, per model."""
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = {r["export"]: r for r in rows if r["model"] == model and not r.get("error")}

        def best(key: str, high: bool, ok: dict[str, dict[str, Any]] = ok) -> str | None:
            have = [e for e in ok if ok[e].get(key) is not None]
            if not have:
                return None
            return (max if high else min)(have, key=lambda e: ok[e][key])

        def ratio(a: str, b: str, key: str, ok: dict[str, dict[str, Any]] = ok) -> float | None:
            if a in ok and b in ok and ok[a].get(key) and ok[b].get(key):
                return round(ok[a][key] / ok[b][key], 2)
            return None

        summary[model] = {
            "fastest_batch1": best("latency_ms_p50", high=False),
            "highest_throughput": best("throughput_ips", high=True),
            "smallest": best("gzip_bytes", high=False),
            "most_accurate": best("accuracy", high=True),
            "keras_over_int8_latency": ratio("keras", "litert-int8", "latency_ms_p50"),
            "int8_over_keras_throughput": ratio("litert-int8", "keras", "throughput_ips"),
            "onnxruntime_over_litert_float32_latency": ratio(
                "onnxruntime", "litert-float32", "latency_ms_p50"),
            "onnxruntime_over_litert_int8_latency": ratio(
                "onnxruntime", "litert-int8", "latency_ms_p50"),
            "litert_int8_over_onnxruntime_throughput": ratio(
                "litert-int8", "onnxruntime", "throughput_ips"),
        }
    return summary


def bench_model(options: ModelBenchOptions, log: Any = print) -> dict[str, Any]:
    """Run every model's two child processes; rows with efficiency, a summary, the machine."""
    from cluster.bench.peak import measure_peak

    started = time.perf_counter()
    info = describe()
    peak = measure_peak()
    log(f"  measured peak, one core: {peak}")
    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    common = ["--options", json.dumps(asdict(options))]
    with tempfile.TemporaryDirectory(prefix="framecast-bench-model-") as scratch:
        for name in options.models:
            work = Path(scratch) / name
            if not uses_artifact(name, options) and not options.random_weights:
                log(f"  {name}: training ({options.epochs} epoch(s), all cores)")
                _child(["prepare", name, str(work), *common], timeout=7200)
            log(f"  {name}: exporting and measuring accuracy + batch-1 latency (1 thread)")
            load_before = describe()["loadavg"]
            ran = _child(["run", name, str(work), *common], timeout=3600)
            ok = [r["export"] for r in ran["rows"] if not r.get("error")]
            log(f"  {name}: throughput on {os.cpu_count()} threads")
            speed = _child(["throughput", name, str(work), *common,
                            "--shape", json.dumps(ran["input_shape"]),
                            "--classes", str(ran["num_classes"]),
                            "--exports", ",".join(ok)], timeout=3600)
            for row in ran["rows"]:
                row.update(speed.get(row["export"], {}) if not row.get("error") else {})
                add_efficiency(row, ran["macs"], info, peak if "error" not in peak else None)
                rows.append(row)
                log("    " + _row_line(row))
            models.append({k: v for k, v in ran.items() if k != "rows"}
                          | {"loadavg_before": load_before,
                             "loadavg_after": describe()["loadavg"]})
    return {"machine": info, "peak_measured": peak, "options": asdict(options),
            "models": models, "rows": rows,
            "summary": summarize(rows), "loadavg_after": describe()["loadavg"],
            "wall_seconds": round(time.perf_counter() - started, 1)}


def _row_line(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['export']:>15}: {row['error'][:160]}"
    accuracy = f"{100 * row['accuracy']:.2f} %" if "accuracy" in row else "-"
    return (f"{row['export']:>15}: acc {accuracy}  p50 "
            f"{row['latency_ms_p50']:.3f} ms  p99 {row['latency_ms_p99']:.3f} ms  "
            f"{row.get('throughput_ips', 0):,.0f} img/s @ batch {row.get('throughput_batch')}"
            f"  {row['size_bytes'] / 1024:.0f} KiB")


def main(argv: list[str] | None = None) -> None:
    """Child processes of bench model: ``prepare``, ``run`` and ``throughput``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.model")
    parser.add_argument("step", choices=("prepare", "run", "throughput"))
    parser.add_argument("model")
    parser.add_argument("work", type=Path)
    parser.add_argument("--options", required=True)
    parser.add_argument("--shape", default="[]")
    parser.add_argument("--classes", type=int, default=0)
    parser.add_argument("--exports", default="")
    args = parser.parse_args(argv)
    raw = json.loads(args.options)
    raw["batches"] = tuple(raw["batches"])
    options = ModelBenchOptions(**raw)
    if args.step == "prepare":
        result = child_prepare(args.model, args.work, options)
    elif args.step == "run":
        result = child_run(args.model, args.work, options)
    else:
        result = child_throughput(args.model, args.work, options,
                                  tuple(json.loads(args.shape)), args.classes,
                                  [e for e in args.exports.split(",") if e])
    sys.stdout.write(json.dumps(result, default=float) + "\n")


if __name__ == "__main__":
    main()
