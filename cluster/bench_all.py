"""``framecast bench all``: model + serve + pipeline in one run, one JSON, Markdown and PNG.

The sections come from cluster.bench_model (model) and cluster.bench (serve, pipeline);
this module only runs them in order and writes the combined report with the headline
ratios (``bench-all.{json,md,png}``) beside each section's own files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.machine import describe, machine_line, write_report

SECTIONS = ("model", "serve", "pipeline", "scaling")


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
