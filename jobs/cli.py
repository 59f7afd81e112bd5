"""The bodies of ``framecast train``, ``evaluate`` and ``report paper`` (imported lazily)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jobs.config import TrainConfig
from serving.exceptions import FramecastError, UserError

Fail = Callable[..., NoReturn]
EXIT_USAGE = 2
# A FramecastError (bad options, missing data, a tampered artifact, a failed run) is printed
# as a message: exit 2 for options refused before any work, 1 after. Anything else is a bug
# and keeps its traceback.


def run_train(config: TrainConfig, console: Console, fail: Fail) -> None:
    """Validate, train on Ray Train with a live progress bar, export, print a summary."""
    from jobs.train import train_artifact, validate_config

    try:
        validate_config(config)
    except UserError as error:
        fail(str(error), EXIT_USAGE)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=console, transient=False)
    task = progress.add_task("epochs", total=config.epochs, info="")

    def on_epoch(record: dict[str, Any]) -> None:
        info = (f"loss {record.get('loss', float('nan')):.4f} "
                f"acc {record.get('accuracy', float('nan')):.4f} "
                f"val_acc {record.get('val_accuracy', float('nan')):.4f}")
        progress.update(task, completed=int(record.get("epoch", 0)), info=info)

    def on_stage(message: str) -> None:
        progress.console.print(f"[cyan]{message}[/]", highlight=False)

    try:
        with progress:
            metrics = train_artifact(config, on_epoch=on_epoch, on_stage=on_stage)
    except FramecastError as error:
        fail(str(error))
    console.print(_metrics_table(metrics, title=f"{config.model} -> {config.out}"))


def run_evaluate(artifact: Path, dataset: str | None, limit: int | None, runtime: str,
                 as_json: bool, console: Console, fail: Fail) -> None:
    """Verify and evaluate an artifact; print a table or the metrics JSON."""
    from jobs.evaluate import evaluate_artifact

    if limit is not None and limit < 1:
        fail(f"--limit must be >= 1, got {limit}", EXIT_USAGE)
    try:
        with console.status("evaluating...") if not as_json else _nullcontext():
            metrics = evaluate_artifact(artifact, dataset=dataset, limit=limit, runtime=runtime)
    except FramecastError as error:
        fail(str(error))
    if as_json:
        sys.stdout.write(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        return
    console.print(_metrics_table(metrics, title=str(artifact)))


def run_report_paper(out: Path, quick: bool, console: Console, fail: Fail,
                     dataset: str = "fashion-mnist", input_size: int | None = None) -> None:
    """Train and evaluate the three models and write the paper's table, side by side."""
    from jobs.report import report_spec, write_paper_report

    try:
        report_spec(dataset, quick, input_size)  # refuses bad options before any work
    except UserError as error:
        fail(str(error), EXIT_USAGE)
    try:
        paths = write_paper_report(out, quick=quick, console=console, dataset=dataset,
                                   input_size=input_size)
    except FramecastError as error:
        fail(str(error))
    for path in paths:
        console.print(f"wrote {path}", highlight=False)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _metrics_table(metrics: dict[str, Any], title: str) -> Table:
    table = Table("metric", "value", title=title)
    keys = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "latency_ms_p50",
            "latency_ms_p99", "throughput_ips", "size_bytes", "gzip_bytes", "param_count",
            "sparsity", "peak_rss_mb", "samples", "runtime", "train_seconds")
    for key in keys:
        if key in metrics and metrics[key] is not None:
            value = metrics[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    if isinstance(metrics.get("float"), dict):
        table.add_row("float accuracy", f"{metrics['float']['accuracy']:.4f}")
        table.add_row("float latency_ms_p50", f"{metrics['float']['latency_ms_p50']:.4f}")
    return table
