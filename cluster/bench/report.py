"""The reports of ``framecast bench``: each section's ``bench-<what>.json``, ``.md`` and
``.png`` (model, serve, pipeline, scaling), and ``bench all``'s combined one with the headline
ratios (``bench-all.{json,md,png}``) beside them.

The measuring modules (cluster.bench.model, .serve, .pipeline, .scaling) return plain dicts;
this module only renders them. Every report is written by :func:`jobs.machine.write_report`
(``framecast sweep``'s too), so all of them start from the same machine line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.machine import describe, machine_line, provenance, write_report

# -- serve and pipeline -----------------------------------------------------------------------


def _section_header(what: str, results: dict[str, Any]) -> list[str]:
    """Title, machine, served artifact and (pipeline) the unmeasured warm-up."""
    lines = [
        f"# framecast bench {what}",
        "",
        f"Machine: {machine_line(results['machine'])}.",
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
    return lines


def _one_axis_plot(path: Path, what: str, draw: Callable[[Any], None]) -> None:
    """A 7x4 in figure of one axis that draw(axis) fills, with legend and title, to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    draw(axis)
    axis.legend()
    axis.set_title(f"framecast bench {what}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def serve_markdown(results: dict[str, Any]) -> str:
    """bench-serve.md: every path's frames/s and latency, and the Serve overhead."""
    lines = [
        *_section_header("serve", results),
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
    return "\n".join(lines) + "\n"


def plot_serve(results: dict[str, Any], path: Path) -> None:
    """Frames/s by frames per call: direct LiteRT, and the Serve handle at 1 and 4 calls."""

    def draw(axis: Any) -> None:
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

    _one_axis_plot(path, "serve", draw)


def write_serve_outputs(out_dir: Path, results: dict[str, Any]) -> list[Path]:
    """bench-serve.json, .md and .png."""
    return write_report(out_dir, "bench-serve", results, serve_markdown(results), plot_serve)


def pipeline_markdown(results: dict[str, Any]) -> str:
    """bench-pipeline.md: every run's sustained rate and latency, and the ratio to naive."""
    lines = [
        *_section_header("pipeline", results),
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
    return "\n".join(lines) + "\n"


def plot_pipeline(results: dict[str, Any], path: Path) -> None:
    """p50 and p99 end-to-end latency against the offered load (framecast's paced runs)."""

    def draw(axis: Any) -> None:
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

    _one_axis_plot(path, "pipeline", draw)


def write_pipeline_outputs(out_dir: Path, results: dict[str, Any]) -> list[Path]:
    """bench-pipeline.json, .md and .png."""
    return write_report(out_dir, "bench-pipeline", results, pipeline_markdown(results),
                        plot_pipeline)


def pipeline_camera_markdown(results: dict[str, Any], command: str) -> str:
    """bench-pipeline.md for ``--frame-size``: per frame size, the offered-load latency, the
    flat-out rate and the decode share."""
    model = results["model_ms_per_frame"]
    offered = f"{results['cameras']}x{results['fps_per_camera']:g} fps"
    lines = [
        *_section_header("pipeline --frame-size", results),
        f"Command: `{command}`", "",
        f"RGB JPEG camera frames, a clip encoded once and looped by a camera process of its "
        f"own (its CPU is reported apart); the model {model['precision']} {model['runtime']} at "
        f"{'x'.join(str(d) for d in model['input_hwc'])}: {model['p50_ms']} ms/frame at batch "
        f"{model['batch']} on one thread. Offered load {offered}, one frame per message; "
        "flat out: 4 cameras, 16 frames per message. Decode share = decode p50 / (decode p50 "
        "+ the model's ms/frame).", "",
        f"| frame | JPEG bytes | {offered} p50 ms | p99 ms | flat-out frames/s | decode p50 "
        "ms (offered / flat out) | decode share | cameras' CPU s (offered / flat out) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["sizes"]:
        cpu = (row["offered"]["producer"].get("cpu_seconds"),
               row["flat_out"]["producer"].get("cpu_seconds"))
        lines.append(
            f"| {row['frame_size']} | {row['jpeg_bytes_mean']} | {row['offered_p50_ms']} "
            f"| {row['offered_p99_ms']} | {row['flat_out_fps']} | {row['decode_p50_ms']} / "
            f"{row['flat_out_decode_p50_ms']} | {_f(row['decode_share'], '.0%')} "
            f"| {cpu[0]} / {cpu[1]} |")
    clips = {row["clip"] for row in results["sizes"]}
    lines += ["", f"Frames: {', '.join(sorted(str(c) for c in clips))}."]
    return "\n".join(lines) + "\n"


def plot_pipeline_camera(results: dict[str, Any], path: Path) -> None:
    """Flat-out frames/s per frame size."""

    def draw(axis: Any) -> None:
        names = [row["frame_size"] for row in results["sizes"]]
        axis.bar(names, [row["flat_out_fps"] or 0 for row in results["sizes"]],
                 label="flat out, Kafka -> Serve -> Kafka")
        axis.set_xlabel("frame size")
        axis.set_ylabel("flat-out frames/s")

    _one_axis_plot(path, "pipeline --frame-size", draw)


def write_pipeline_camera_outputs(out_dir: Path, results: dict[str, Any],
                                  command: str) -> list[Path]:
    """bench-pipeline.json, .md and .png of ``bench pipeline --frame-size``."""
    return write_report(out_dir, "bench-pipeline", {**results, "command": command},
                        pipeline_camera_markdown(results, command), plot_pipeline_camera)


# -- scaling ----------------------------------------------------------------------------------


def scaling_markdown(results: dict[str, Any], command: str) -> str:
    """bench-scaling.md: each (replicas, classifiers) run, the best, the extrapolation."""
    load = results["offered_load"]
    offered = f"{load['cameras']}x{load['fps_per_camera']:g} fps"
    lines = [
        "# framecast bench scaling", "", f"Command: `{command}`", "",
        f"Machine: {machine_line(results['machine'])}; Ray CPUs {results['ray_cpus']:g}.", "",
        f"| Serve replicas (CPUs each) | classifier processes | flat-out frames/s | "
        f"p50 ms at {offered} | p99 ms at {offered} | labels/frames |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        f, o = r["flat_out"], r["offered"]
        lines.append(
            f"| {r['replicas']} ({r['cpus_per_replica']:g}) | {r['classifiers']} | "
            f"{f['sustained_fps']} | {o['p50_ms']} | {o['p99_ms']} | "
            f"{f['labels'] + o['labels']}/{f['frames'] + o['frames']} |"
        )
    x = results["extrapolation"]
    lines += [
        "",
        f"Best: {x['best']['replicas']} replica(s) x {x['best']['classifiers']} classifier(s), "
        f"{x['best']['sustained_fps']} frames/s. One replica sustains {x['per_replica_fps']} "
        "frames/s here; arithmetic, not a measurement: replicas of this kind needed for "
        + ", ".join(f"{int(t):,} frames/s: {n}" for t, n in x["replicas_needed"].items())
        + " (on a cluster, with one core per replica and classifiers and brokers elsewhere).",
    ]
    return "\n".join(lines) + "\n"


def plot_scaling(results: dict[str, Any], path: Path) -> None:
    """Flat-out frames/s and p99 at the offered load against replicas, a line per classifiers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = results["offered_load"]
    offered = f"{load['cameras']}x{load['fps_per_camera']:g} fps"
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for members in sorted({r["classifiers"] for r in results["runs"]}):
        rows = [r for r in results["runs"] if r["classifiers"] == members]
        counts = [r["replicas"] for r in rows]
        left.plot(counts, [r["flat_out"]["sustained_fps"] for r in rows], "o-",
                  label=f"{members} classifier(s)")
        right.plot(counts, [r["offered"]["p99_ms"] for r in rows], "s-",
                   label=f"{members} classifier(s)")
    left.set_xlabel("Serve replicas")
    left.set_ylabel("flat-out frames/s")
    right.set_xlabel("Serve replicas")
    right.set_ylabel(f"p99 ms at {offered}")
    for axis in (left, right):
        axis.legend()
    figure.suptitle("framecast bench scaling")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_scaling_outputs(out_dir: Path, results: dict[str, Any], command: str) -> list[Path]:
    """bench-scaling.json, .md and .png."""
    return write_report(out_dir, "bench-scaling", results, scaling_markdown(results, command),
                        plot_scaling)


# -- model ----------------------------------------------------------------------------------


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def model_markdown(results: dict[str, Any], command: str) -> list[str]:
    """The bench model section as Markdown lines."""
    opts = results["options"]
    lines = [
        "## Model: each export, and the peers",
        "",
        *provenance(command, results["machine"], results["loadavg_after"]),
        (f"Dataset {opts['dataset']}, accuracy on the first {opts['test_limit'] or 'all'} test "
         "images. " if not opts.get("random_weights") else "")
        + f"Latency: batch 1, one thread, {opts['latency_samples']} timed calls after "
        "20 warm-up calls, uint8 in -> probabilities out (normalization and int8 "
        f"(de)quantization included). Throughput: best of batches {list(opts['batches'])} on "
        f"all cores, {opts['throughput_seconds']} s per batch. Keras = `model.predict`; "
        "ONNX Runtime = the same weights through tf2onnx (opset 17), CPU provider, all graph "
        "optimizations. Efficiency = MACs/image x images/s / peak MAC/s of the cores used.",
        "",
    ]
    if opts.get("random_weights") or opts.get("input_size"):
        lines += [f"Input {opts.get('input_size') or 'as the dataset'} x "
                  f"{opts.get('input_size') or ''} RGB"
                  + ("; random weights and camera-like images (cluster.bench.decode."
                     "camera_jpeg): latency only, accuracy not measured"
                     if opts.get("random_weights") else "") + ".", ""]
    for model in results["models"]:
        lines += [f"### {model['model']}", "",
                  f"Weights: {model['source']}. {model['params']:,} parameters, "
                  f"{model['macs'] / 1e6:.2f} M MACs per image. Load average before/after: "
                  f"{model['loadavg_before']} / {model['loadavg_after']}.", "",
                  "| export | accuracy % | F1 | p50 ms | p99 ms | images/s (batch) | size KiB "
                  "| gzip KiB | eff. batch-1 % | eff. throughput % | images/s by batch "
                  "| eff. vs measured peak: batch-1 / by batch % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in results["rows"] if r["model"] == model["model"]):
            if row.get("error"):
                lines.append(f"| {row['export']} | error: {row['error'][:200]} "
                             "| | | | | | | | | | |")
                continue
            accuracy = row.get("accuracy")
            by_batch = row.get("throughput_by_batch") or {}
            measured = row.get("efficiency_by_batch_measured_pct") or {}
            lines.append(
                f"| {row['export']} | {_f(None if accuracy is None else 100 * accuracy, '.2f')} "
                f"| {_f(row.get('f1_macro'), '.4f')} "
                f"| {row['latency_ms_p50']:.3f} | {row['latency_ms_p99']:.3f} "
                f"| {_f(row.get('throughput_ips'), ',.0f')} ({row.get('throughput_batch')}) "
                f"| {row['size_bytes'] / 1024:.1f} | {row['gzip_bytes'] / 1024:.1f} "
                f"| {_f(row.get('efficiency_latency_pct'), '.2f')} "
                f"| {_f(row.get('efficiency_throughput_pct'), '.2f')} "
                f"| {', '.join(f'{b}: {v:,.0f}' for b, v in by_batch.items())} "
                f"| {_f(row.get('efficiency_latency_measured_pct'), '.1f')} / "
                f"{', '.join(f'{b}: {v:.1f}' for b, v in measured.items()) or '–'} |")
        s = results["summary"][model["model"]]
        lines += ["", f"Winners: batch-1 latency **{s['fastest_batch1']}**, throughput "
                      f"**{s['highest_throughput']}**, size **{s['smallest']}**, accuracy "
                      f"**{s['most_accurate']}**. Keras predict p50 / LiteRT int8 p50 = "
                      f"{_f(s['keras_over_int8_latency'], '')}x; ONNX Runtime p50 / LiteRT "
                      f"float32 p50 = {_f(s['onnxruntime_over_litert_float32_latency'], '')}x, "
                      f"/ LiteRT int8 p50 = {_f(s['onnxruntime_over_litert_int8_latency'], '')}"
                      f"x; LiteRT int8 / ONNX Runtime throughput = "
                      f"{_f(s['litert_int8_over_onnxruntime_throughput'], '')}x.", ""]
    peaks = {r["compute_dtype"]: r["peak_formula"] for r in results["rows"]
             if r.get("peak_formula")}
    lines += ["Peak MAC rate per core, as computed from /proc/cpuinfo: "
              + "; ".join(f"{k}: {v}" for k, v in sorted(peaks.items())) + ".", ""]
    peak = results.get("peak_measured") or {}
    if "error" in peak:
        lines += [f"Measured peak: not measured ({peak['error']}).", ""]
    elif peak:
        lines += [f"Measured peak, one core (cluster/bench/peak.py): int8 "
                  f"{peak['int8_gmacs_1core']} GMAC/s ({peak['int8_macs_per_cycle']} MAC/cycle), "
                  f"fp32 {peak['fp32_gmacs_1core']} GMAC/s ({peak['fp32_macs_per_cycle']} "
                  f"MAC/cycle) at {peak['clock_ghz']} GHz - {peak['how']}. Throughput by batch "
                  "runs on all cores: its efficiency is against that many times the one-core "
                  "peak.", ""]
    return lines


def plot_model(results: dict[str, Any], path: Path) -> None:
    """Batch-1 p50 latency and best throughput per export, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.variants import EXPORTS

    names = [m["model"] for m in results["models"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / max(1, len(EXPORTS))
    for k, export in enumerate(EXPORTS):
        lat, ips = [], []
        for name in names:
            row = next((r for r in results["rows"] if r["model"] == name
                        and r["export"] == export and not r.get("error")), None)
            lat.append(row["latency_ms_p50"] if row else 0)
            ips.append(row.get("throughput_ips", 0) if row else 0)
        xs = [i + (k - len(EXPORTS) / 2 + 0.5) * width for i in range(len(names))]
        axes[0].bar(xs, lat, width, label=export, color=f"C{k}")
        axes[1].bar(xs, ips, width, label=export, color=f"C{k}")
    for axis, title in ((axes[0], "p50 latency, batch 1, 1 thread (ms, log)"),
                        (axes[1], "throughput at best batch, all cores (images/s, log)")):
        axis.set_xticks(range(len(names)), names)
        axis.set_yscale("log")
        axis.set_title(title)
        axis.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=8)
    fig.suptitle("framecast bench model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_model_outputs(out_dir: Path, results: dict[str, Any], command: str) -> list[Path]:
    """bench-model.json, .md and .png."""
    text = "\n".join(["# framecast bench model", "", *model_markdown(results, command)]) + "\n"
    return write_report(out_dir, "bench-model", results, text, plot_model)


# -- peers ----------------------------------------------------------------------------------


def peers_markdown(results: dict[str, Any]) -> str:
    """bench-peers.md: each pipeline's flat-out rate, frames per CPU-second, capacity at p99
    15 and 50 ms, and p50/p99 at the fixed loads; skipped and failed pipelines with why."""
    loads = sorted({round(x) for x in results["options"]["fixed_loads"]})
    size = results.get("frame_size")  # None: the 28x28 regime
    lines = [
        f"# framecast bench peers: {f'{size} camera JPEG frames' if size else '28x28 frames'}",
        "", f"Command: `{results['command']}` ({results['date']})",
        "", f"Machine: {machine_line(results['machine'])}.", "",
        f"Frames: {results.get('frames', '28x28 Fashion-MNIST frames')}.", "",
        f"Model: `{results['artifact']}` (the same file for every pipeline). CPU counted: "
        f"{results['counted_cpu']}. Frames per CPU-second = frames / those CPU seconds over the "
        "flat-out run (the frames/s of one fully busy core).", "",
        "| pipeline | flat-out frames/s | frames per CPU-second | capacity p99 <= 15 ms | "
        "capacity p99 <= 50 ms | " + " | ".join(f"p50/p99 ms at {x} fps" for x in loads) + " |",
        "|---|---|---|---|---|" + "---|" * len(loads),
    ]
    for p in results["pipelines"]:
        if "skipped" in p or "error" in p:
            what = f"skipped: {p['skipped']}" if "skipped" in p else f"failed: {p['error']}"
            lines.append(f"| {p['name']} | {what[:300]} | | | |" + " |" * len(loads))
            continue
        at = {round(r["offered_fps"]): r for r in p["loads"]}
        cells = [f"{at[x]['p50_ms']} / {at[x]['p99_ms']}" if x in at else "not run (a lower "
                 "load failed)" for x in loads]
        lines.append(
            f"| {p['name']} | {p['frames_per_s']} | {p['frames_per_s_per_core']} | "
            f"{p['capacity_fps_p99_15ms']} | {p['capacity_fps_p99_50ms']} | "
            + " | ".join(cells) + " |")
    notes = [f"- {p['name']}, p99 <= {b} ms: {p[f'capacity_fps_p99_{b}ms_note']}"
             for p in results["pipelines"] for b in (15, 50)
             if p.get(f"capacity_fps_p99_{b}ms_note")]
    lines += ["", "Capacity: the highest offered frames/s (cameras x fps, each step "
              f"{results['options']['step_seconds']:g} s) at which every frame was labelled and "
              "the p99 end-to-end (labeled_at - captured_at) stayed within the bound: a ladder "
              "of loads, then bisection. A step failing even the 50 ms bound is measured once "
              "more and the second measurement counts (one stall does not end a ladder; "
              "`loads[].note` in the JSON says which were re-measured).", "", *notes, ""]
    return "\n".join(lines) + "\n"


def plot_peers(results: dict[str, Any], path: Path) -> None:
    """Capacity per pipeline at p99 <= 15 ms and <= 50 ms, two bars each."""

    def draw(axis: Any) -> None:
        rows = [p for p in results["pipelines"] if "frames_per_s" in p]
        xs = range(len(rows))
        for k, bound in enumerate((15, 50)):
            axis.bar([x + (k - 0.5) * 0.4 for x in xs],
                     [p[f"capacity_fps_p99_{bound}ms"] or 0 for p in rows], 0.4,
                     label=f"p99 <= {bound} ms", color=f"C{k}")
        axis.set_xticks(list(xs), [p["name"] for p in rows])
        axis.set_ylabel("capacity (offered frames/s)")

    _one_axis_plot(path, "peers", draw)


def write_peers_outputs(out_dir: Path, results: dict[str, Any]) -> list[Path]:
    """bench-peers.json, .md and .png."""
    return write_report(out_dir, "bench-peers", results, peers_markdown(results), plot_peers)


# -- all ------------------------------------------------------------------------------------


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios a reader wants first, from whichever sections ran."""
    out: dict[str, Any] = {}
    model = results.get("model")
    if model:
        for name, summary in model["summary"].items():
            out[f"{name}: Keras predict p50 / LiteRT int8 p50"] = summary[
                "keras_over_int8_latency"]
            out[f"{name}: ONNX Runtime p50 / LiteRT int8 p50"] = summary[
                "onnxruntime_over_litert_int8_latency"]
            out[f"{name}: ONNX Runtime p50 / LiteRT float32 p50"] = summary[
                "onnxruntime_over_litert_float32_latency"]
            out[f"{name}: fastest batch-1 export"] = summary["fastest_batch1"]
            out[f"{name}: highest-throughput export"] = summary["highest_throughput"]
            int8 = next((r for r in model["rows"] if r["model"] == name
                         and r["export"] == "litert-int8" and not r.get("error")), None)
            if int8 and int8.get("efficiency_throughput_pct") is not None:
                out[f"{name}: LiteRT int8 efficiency, throughput (% of int8 peak)"] = round(
                    int8["efficiency_throughput_pct"], 2)
    serve = results.get("serve")
    if serve:
        out["serve: direct LiteRT / Serve handle frames/s, by batch"] = serve["overhead"]
    pipeline = results.get("pipeline")
    if pipeline:
        out["pipeline: best framecast sustained frames/s / naive Keras per frame"] = pipeline[
            "ratio_vs_naive"]
    for p in (results.get("peers") or {}).get("pipelines", []):
        if "frames_per_s" in p:
            out[f"peers: {p['name']} capacity fps at p99 <= 15 / 50 ms, frames per CPU-s"] = (
                f"{p['capacity_fps_p99_15ms']} / {p['capacity_fps_p99_50ms']}, "
                f"{p['frames_per_s_per_core']}")
    scaling = results.get("scaling")
    if scaling:
        best = scaling["extrapolation"]["best"]
        out["scaling: best flat-out frames/s (replicas x classifier processes)"] = (
            f"{best['sustained_fps']} ({best['replicas']} x {best['classifiers']})")
    return out


def all_markdown(results: dict[str, Any], command: str) -> str:
    """bench-all.md: the headline, then each section's own Markdown."""
    lines = ["# framecast bench all", "", f"Command: `{command}`", "",
             f"Machine: {machine_line(results['machine'])}.", "",
             f"Wall time: {results['wall_seconds']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in results['section_seconds'].items())}); "
             f"load average after: {'/'.join(str(x) for x in results['loadavg_after'])}.",
             "", "## Headline", "", "| measure | value |", "|---|---|"]
    for key, value in results["headline"].items():
        lines.append(f"| {key} | {value} |")
    lines.append("")
    for section, text in results.get("section_markdown", {}).items():
        lines += [f"<!-- section {section} -->", text.replace("\n# ", "\n## "), ""]
    return "\n".join(lines) + "\n"


def plot_all(results: dict[str, Any], path: Path) -> None:
    """One figure: export latency (model), direct vs Serve (serve), sustained rate (pipeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    model = results.get("model")
    if model:
        rows = [r for r in model["rows"] if not r.get("error")]
        labels = [f"{r['model'][:9]}\n{r['export']}" for r in rows]
        axes[0].barh(range(len(rows)), [r["latency_ms_p50"] for r in rows],
                     color=[f"C{i % 10}" for i in range(len(rows))])
        axes[0].set_yticks(range(len(rows)), labels, fontsize=6)
        axes[0].set_xscale("log")
        axes[0].set_title("model: p50 ms, batch 1, 1 thread (log)")
    serve = results.get("serve")
    if serve:
        sizes = [int(b) for b in serve["direct"]]
        axes[1].plot(sizes, [r["fps"] for r in serve["direct"].values()], "o-",
                     label="direct LiteRT")
        axes[1].plot(sizes, [serve["handle"][f"{b}x4"]["fps"] for b in sizes], "s-",
                     label="Serve handle x4")
        axes[1].set_xscale("log", base=2)
        axes[1].set(xlabel="frames per call", ylabel="frames/s",
                    title="serve: direct vs Ray Serve")
        axes[1].legend(fontsize=8)
    pipeline = results.get("pipeline")
    if pipeline:
        runs = pipeline["runs"]
        names = [f"{r['classifier']}\n" + (f"{r['cameras']}x{r['fps_per_camera']:g}"
                                           if r["fps_per_camera"] else "flat out") for r in runs]
        axes[2].bar(range(len(runs)), [r["sustained_fps"] or 0 for r in runs],
                    color=["C0" if r["classifier"] == "framecast" else "C3" for r in runs])
        axes[2].set_xticks(range(len(runs)), names, fontsize=7)
        axes[2].set(ylabel="sustained frames/s", title="pipeline: Kafka -> Serve -> Kafka")
    for axis in axes:
        axis.grid(alpha=0.3)
    fig.suptitle("framecast bench all - " + machine_line(results["machine"])[:150], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all_outputs(out_dir: Path, results: dict[str, Any], command: str) -> list[Path]:
    """bench-all.json, bench-all.md and bench-all.png."""
    results["headline"] = headline(results)
    results.setdefault("loadavg_after", describe()["loadavg"])
    return write_report(out_dir, "bench-all", results, all_markdown(results, command), plot_all)
