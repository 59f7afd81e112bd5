"""`framecast demo`: the main job, end to end, on the embedded stack.

1. start the stack (a real Kafka broker + a local Ray head), unless it already runs;
2. deploy the preset's shipped int8 model on Ray Serve;
3. produce the preset's video (ground truth in every frame) from several cameras, in real
   time, into this run's own frames topic: ``scenes`` (the default) 640x480 RGB JPEG camera
   scenes through ``models/scenes``; ``fashion-mnist`` garments drifting across a 32 px PNG
   frame through ``models/fashion_mnist_optimized``;
4. classify it with the stream classifier (Kafka -> Serve -> Kafka) while a reader of the
   labels topic shows live progress: frames in/out, fps, latency p50/p99, online accuracy;
5. print a summary and write a report (JSON, Markdown, latency histogram PNG);
6. stop what it started and delete its topics: no process is left behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import resource
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cluster import stack
from cluster.cameras import CameraProcess
from cluster.settings import FramecastSettings

if TYPE_CHECKING:
    from cluster.dashboard.process import DashboardProcess

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED_MODEL = MODELS / "fashion_mnist_optimized"  # the benchmarks' model, too
SCENES_MODEL = MODELS / "scenes"
WINDOW_S = 10.0  # the report's latency-over-time windows


@dataclass(frozen=True)
class DemoPreset:
    """What one demo runs: its cameras (a ``framecast produce`` source) and its model."""

    name: str
    source: str  # produce --source
    encoding: str  # produce --encoding
    frame_size: str | None  # produce --frame-size (None: the source's own default)
    artifact: Path
    cameras: int
    fps: float
    seconds: float
    what: str  # one line for people

    def problem(self, artifact: Path | None = None) -> str | None:
        """Why this preset cannot run here (None when it can): a part not shipped yet."""
        model = artifact or self.artifact
        if not (model / "manifest.json").is_file():
            return f"the {self.name} preset's model {model} is not there (no manifest.json)"
        if (self.source.startswith("scenes")
                and importlib.util.find_spec("streams.scene_source") is None):
            return "the scenes camera (streams/scene_source.py, produce --source scenes) is missing"
        return None


PRESETS: dict[str, DemoPreset] = {
    "scenes": DemoPreset(
        "scenes", source="scenes", encoding="jpeg", frame_size="640x480",
        artifact=SCENES_MODEL, cameras=8, fps=15.0, seconds=90.0,
        what="640x480 RGB JPEG camera scenes, the shipped RGB int8 model (models/scenes)"),
    # The same cameras drawn by the held-out generator (other backgrounds, tints, sizes,
    # positions): how the model holds up on scenes unlike its training data.
    "scenes-heldout": DemoPreset(
        "scenes-heldout", source="scenes:heldout", encoding="jpeg", frame_size="640x480",
        artifact=SCENES_MODEL, cameras=8, fps=15.0, seconds=90.0,
        what="640x480 RGB JPEG scenes of the held-out generator, models/scenes"),
    "fashion-mnist": DemoPreset(
        "fashion-mnist", source="synthetic", encoding="png", frame_size=None,
        artifact=SHIPPED_MODEL, cameras=8, fps=30.0, seconds=60.0,
        what="garments drifting across a 32 px PNG frame, models/fashion_mnist_optimized"),
}
DEFAULT_PRESET = "scenes"


class _LabelReader:
    """Reads this run's labels topic and keeps the live statistics."""

    def __init__(self, settings: FramecastSettings, bootstrap: str, topic: str) -> None:
        from streams.client import group_free_consumer, topic_reader

        log = logging.getLogger(f"{__name__}.labels")
        self.consumer = topic_reader(settings.kafka, bootstrap, topic, log)
        # The frames topic's end offsets: frames in, as the broker has them (main thread only).
        self.offsets = group_free_consumer(settings.kafka, bootstrap, log)
        self.timeout_s = settings.kafka.request_timeout_ms / 1000
        self.latencies: list[float] = []
        self.decode_ms: list[float] = []  # each label's timings_ms.decode (0 where absent)
        self.labelled_at_ns: list[int] = []
        self.labelled = 0
        self.dropped = 0
        self.correct = 0
        self.with_truth = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="demo-labels", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for message in self.consumer.consume(num_messages=500, timeout=0.2):
                value = message.value()
                if message.error() is not None or value is None:
                    continue  # librdkafka retries by itself and logs what it could not do
                record = json.loads(value)
                self.last_ns = record["labeled_at_ns"]
                self.first_ns = self.first_ns or self.last_ns
                if record["status"] != "ok":
                    self.dropped += 1
                    continue
                self.labelled += 1
                self.latencies.append(record["timings_ms"]["end_to_end"])
                self.decode_ms.append(record["timings_ms"].get("decode", 0.0))
                self.labelled_at_ns.append(record["labeled_at_ns"])
                if record["ground_truth"] is not None:
                    self.with_truth += 1
                    self.correct += int(record["class_id"] == record["ground_truth"])
        self.consumer.close()

    def frames_in(self, frames_topic: str) -> int:
        """Frames the broker holds in ``frames_topic`` (one frame a message in the demo)."""
        from confluent_kafka import TopicPartition

        topic = self.offsets.list_topics(frames_topic, timeout=self.timeout_s).topics[frames_topic]
        return sum(
            self.offsets.get_watermark_offsets(
                TopicPartition(frames_topic, partition), timeout=self.timeout_s
            )[1]
            for partition in topic.partitions
        )

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.offsets.close()

    def stats(self) -> dict[str, Any]:
        values = np.asarray(self.latencies[-5000:]) if self.latencies else None
        decode = np.asarray(self.decode_ms[-5000:]) if self.decode_ms else None
        span_s = ((self.last_ns or 0) - (self.first_ns or 0)) / 1e9
        return {
            "decode_p50_ms": float(np.percentile(decode, 50)) if decode is not None else None,
            "labelled": self.labelled,
            "dropped_deadline": self.dropped,
            "fps": self.labelled / span_s if span_s > 0 else 0.0,
            "p50_ms": float(np.percentile(values, 50)) if values is not None else None,
            "p99_ms": float(np.percentile(values, 99)) if values is not None else None,
            "accuracy": self.correct / self.with_truth if self.with_truth else None,
        }


def _live_table(sent: int, total: int, stats: dict[str, Any], dlq: int) -> Table:
    table = Table(title="framecast demo: live", show_header=False, min_width=60)
    table.add_column(style="bold")
    table.add_column()

    def ms(value: float | None) -> str:
        return f"{value:.1f} ms" if value is not None else "-"

    accuracy = stats["accuracy"]
    table.add_row("frames in (produced)", f"{sent} / {total}")
    table.add_row("frames out (labelled)", str(stats["labelled"]))
    table.add_row("throughput", f"{stats['fps']:.0f} frames/s")
    table.add_row("latency p50 / p99", f"{ms(stats['p50_ms'])} / {ms(stats['p99_ms'])}")
    table.add_row("online accuracy", f"{accuracy:.1%}" if accuracy is not None else "-")
    table.add_row("decode in the replicas p50", ms(stats["decode_p50_ms"]))
    table.add_row("dropped (deadline) / DLQ", f"{stats['dropped_deadline']} / {dlq}")
    return table


def run_demo(
    settings: FramecastSettings,
    console: Console,
    *,
    preset: DemoPreset | None = None,
    cameras: int | None = None,
    fps: float | None = None,
    seconds: float | None = None,
    frame_size: str | None = None,
    deadline_ms: int | None = None,
    artifact: Path | None = None,
    keep_running: bool = False,
) -> dict[str, Any]:
    """Run the demo; returns the report (also written under HOME/reports/demo/).

    ``preset`` (default: scenes) gives the cameras, the model and the defaults of
    ``cameras``, ``fps``, ``seconds`` and ``frame_size``; the arguments given override it.
    """
    from cluster.exceptions import PrerequisiteError
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown
    from streams.client import admin_client
    from streams.exceptions import StreamsError
    from streams.runner import StreamRun
    from streams.topics import run_topics, topic_names

    preset = preset or PRESETS[DEFAULT_PRESET]
    why_not = preset.problem(artifact)
    if why_not is not None:
        others = ", ".join(name for name, p in PRESETS.items() if p.problem() is None)
        raise PrerequisiteError(f"{why_not}; presets that can run here: {others or 'none'}")
    artifact = artifact or preset.artifact
    cameras = cameras or preset.cameras
    fps = fps or preset.fps
    seconds = seconds or preset.seconds
    frame_size = frame_size or preset.frame_size
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    topics = run_topics(settings.topics, "demo", partitions=max(2, min(cameras, 8)))
    names = topic_names(topics)
    per_camera = max(1, int(fps * seconds))
    total = per_camera * cameras
    t0 = time.monotonic()
    console.rule(f"[bold]framecast demo ({preset.name}: {preset.what})")
    report: dict[str, Any] = {
        "run_id": run_id,
        "preset": preset.name,
        "source": preset.source,
        "encoding": preset.encoding,
        "frame_size": frame_size,
        "cameras": cameras,
        "fps_per_camera": fps,
        "frames_planned": total,
        "artifact": str(artifact),
    }

    def started(event: stack.StackEvent) -> None:
        took = f" in {event.seconds:.1f}s" if event.action == "started" else ""
        console.print(
            f"  [green]{event.component}[/] {event.action}{took}: {event.detail}",
            highlight=False,
        )

    def delete_topics() -> None:
        # A clean-up must never hide why the run ended (the topics may not exist yet).
        try:
            with admin_client(settings.kafka, stack.kafka_bootstrap(settings)) as admin:
                admin.delete_topics(list(names.values()))
        except Exception as error:
            console.print(f"  [yellow]topics not deleted[/]: {str(error)[:200]}",
                          highlight=False)

    # Undone in reverse: the cameras stop, the topics go, the stack is as it was before.
    with contextlib.ExitStack() as cleanup:
        with console.status("starting the embedded stack (Kafka broker + Ray head)..."):
            cleanup.enter_context(stack.session(settings, keep=keep_running, on_event=started))
        cleanup.callback(delete_topics)
        bootstrap = stack.kafka_bootstrap(settings)
        with stack.ray_connection(settings):
            with console.status(f"deploying {artifact.name} on Ray Serve..."):
                serve_settings = settings.serve.model_copy(update={"num_cpus": 0.5})
                result = deploy(
                    artifact, serve_settings, address=None, namespace=settings.ray.namespace
                )
            model = result["model"]
            console.print(
                f"  [green]serve[/] {model['name']} {model['version']} "
                f"({model['runtime']}) healthy in {result['seconds']:.1f}s",
                highlight=False,
            )
            report["model"] = model
            config = settings.stream.model_copy(
                update={
                    "group": f"demo-{run_id}",
                    "deadline_ms": deadline_ms,
                    "latency_window_s": 2.0,
                }
            )
            with StreamRun(settings.kafka, bootstrap, topics, config, settings.serve) as run:
                reader = _LabelReader(settings, bootstrap, names["labels"])
                run.start()
                reader.thread.start()
                board = _dashboard(settings, bootstrap, names, config.group, console)
                cleanup.callback(board.stop)
                with console.status("the classifier joins its consumer group..."):
                    if not run.wait_assigned(timeout_s=120):
                        raise StreamsError("the classifier did not join its group in 120 s")
                # The cameras are a process of their own, as cameras are (cluster/cameras.py).
                # Their CPU is reported apart from the pipeline's: the child's rusage, counted
                # once it is reaped (no other child of this process ends meanwhile).
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                cameras_process = CameraProcess(
                    settings, bootstrap, names["frames"], source=preset.source,
                    cameras=cameras, fps=fps, per_camera=per_camera, encoding=preset.encoding,
                    frame_size=frame_size,
                ).start()
                cleanup.callback(cameras_process.stop)
                totals = run.member.totals
                deadline = time.monotonic() + seconds + 120
                with Live(console=console, refresh_per_second=4) as live:
                    while time.monotonic() < deadline:
                        filming = cameras_process.running()
                        sent = reader.frames_in(names["frames"])
                        stats = reader.stats()
                        live.update(_live_table(sent, total, stats, totals["dlq"]))
                        done = stats["labelled"] + stats["dropped_deadline"] + totals["dlq"]
                        if not filming and done >= sent:
                            break
                        time.sleep(0.25)
                produced = cameras_process.wait(timeout_s=60)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                produced["cpu_seconds"] = round(
                    after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
                run.stop()
                run.finish(timeout_s=60)
                # The page as it was at the end, while the stack is still up.
                shot = settings.home / "reports" / "demo" / "dashboard.png"
                why_not = board.screenshot(shot)
                report["dashboard"] = {"url": board.url, "screenshot": None if why_not else
                                       shot.name, "note": why_not}
            time.sleep(0.5)
            reader.close()
            stats = reader.stats()
            report.update(_summarize(reader, produced, totals, stats))
            if not keep_running:
                serve_shutdown(
                    settings.serve.app_name, address=None, namespace=settings.ray.namespace
                )
    report["seconds"] = round(time.monotonic() - t0, 1)
    out_dir = settings.home / "reports" / "demo"
    _write_report(out_dir, report, reader.latencies)
    _print_summary(console, report, out_dir)
    return report


def _dashboard(
    settings: FramecastSettings, bootstrap: str, names: dict[str, str], group: str,
    console: Console,
) -> DashboardProcess:
    """`framecast dashboard` of this run's topics, in a process of its own (it prints why
    not, and the demo goes on without it, if it cannot start)."""
    from cluster.dashboard.process import DashboardProcess

    serve = settings.serve
    board = DashboardProcess(settings, bootstrap, names, classifier_group=group,
                             serve_url=serve.http_url + serve.route_prefix.rstrip("/")).start()
    if board.error is None:
        console.print(f"  [green]dashboard[/] {board.url} (live while the demo runs)",
                      highlight=False)
    else:
        console.print(f"  [yellow]dashboard not started[/]: {board.error}", highlight=False)
    return board


def _summarize(
    reader: _LabelReader, produced: dict[str, Any], totals: dict[str, Any], stats: dict[str, Any]
) -> dict[str, Any]:
    values = np.asarray(reader.latencies) if reader.latencies else np.asarray([np.nan])
    frames = int(produced.get("frames", 0))
    out = int(stats["labelled"] + stats["dropped_deadline"] + totals.get("dlq", 0))
    return {
        "frames_produced": frames,
        "labels": stats["labelled"],
        "dropped_deadline": stats["dropped_deadline"],
        "dlq": int(totals.get("dlq", 0)),
        "unaccounted": frames - out,
        "produce_fps": produced.get("fps"),
        "label_fps": round(stats["fps"], 1),
        "online_accuracy": stats["accuracy"],
        "latency_ms": {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)},
        "latency_ms_by_window": latency_by_window(reader.latencies, reader.labelled_at_ns),
        "decode": decode_summary(reader.decode_ms, reader.latencies),
        "cameras_cpu_seconds": produced.get("cpu_seconds"),  # the whole camera process
        "cameras_sending_cpu_s": produced.get("cpu_s"),  # of it: while sending frames
        "cameras_prerender_s": produced.get("prerender_s"),  # scenes: clips made before
        "notes": produced.get("notes", []),
    }


def decode_summary(decode_ms: list[float], latencies: list[float]) -> dict[str, Any] | None:
    """The replicas' decoding of the labelled frames (label ``timings_ms.decode``): p50 and
    mean ms per frame, and its share of the frames' end-to-end latency (sum over sum, %)."""
    if not decode_ms or not latencies:
        return None
    values = np.asarray(decode_ms, dtype=float)
    total = float(np.sum(latencies))
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "mean_ms": round(float(values.mean()), 3),
        "share_of_end_to_end_pct": round(100 * float(values.sum()) / total, 2) if total else None,
    }


def _decode_text(report: dict[str, Any]) -> str:
    decode = report.get("decode")
    if not decode:
        return "-"
    share = decode["share_of_end_to_end_pct"]
    return (f"{decode['p50_ms']} ms p50 / {decode['mean_ms']} ms mean a frame"
            + (f", {share:g} % of end-to-end" if share is not None else ""))


def latency_by_window(
    latencies: list[float], labelled_at_ns: list[int], window_s: float = WINDOW_S
) -> list[dict[str, Any]]:
    """p50 / p99 of the labels in each ``window_s`` of the run, by when they were labelled.

    A just-started broker and Ray are slower in the first seconds (the JVM compiles, Serve's
    first calls); the windows show it, where one p99 for the whole run would hide it.
    """
    if not latencies:
        return []
    values = np.asarray(latencies)
    seconds = (np.asarray(labelled_at_ns) - min(labelled_at_ns)) / 1e9
    index = (seconds // window_s).astype(int)
    windows = []
    for k in range(int(index.max()) + 1):
        chosen = values[index == k]
        if chosen.size:
            windows.append({
                "from_s": round(k * window_s, 1),
                "frames": int(chosen.size),
                "p50": round(float(np.percentile(chosen, 50)), 2),
                "p99": round(float(np.percentile(chosen, 99)), 2),
            })
    return windows


def _write_report(out_dir: Path, report: dict[str, Any], latencies: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    windows = report.get("latency_ms_by_window", [])
    if latencies:
        figure, (axis, over_time) = plt.subplots(1, 2, figsize=(12, 4))
        axis.hist(latencies, bins=60, color="#3b7dd8")
        for q, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(latencies, q))
            axis.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.1f} ms")
        axis.set_xlabel("end-to-end latency, capture -> label (ms)")
        axis.set_ylabel("frames")
        axis.set_title(f"framecast demo {report['run_id']}: {report.get('labels', 0)} frames")
        axis.legend()
        starts = [w["from_s"] for w in windows]
        for name, style in (("p50", "--"), ("p99", ":")):
            over_time.plot(starts, [w[name] for w in windows], style, marker="o", label=name)
        over_time.set_xlabel(f"seconds since the first label ({WINDOW_S:g} s windows)")
        over_time.set_ylabel("end-to-end latency (ms)")
        over_time.set_title("latency over the run")
        over_time.set_ylim(bottom=0)
        over_time.legend()
        figure.tight_layout()
        figure.savefig(out_dir / "latency_histogram.png", dpi=110)
        plt.close(figure)
    lat = report.get("latency_ms", {})
    accuracy = report.get("online_accuracy")
    (out_dir / "demo.md").write_text(
        f"# framecast demo {report['run_id']}\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| preset (source, encoding, frame size) | {report.get('preset')} "
        f"({report.get('source')}, {report.get('encoding')}, "
        f"{report.get('frame_size') or 'default'}) |\n"
        f"| model | {_model_text(report)} |\n"
        f"| cameras x fps | {report['cameras']} x {report['fps_per_camera']:g} |\n"
        f"| frames produced / labelled | {report.get('frames_produced')} / "
        f"{report.get('labels')} |\n"
        f"| dropped (deadline) / DLQ / unaccounted | {report.get('dropped_deadline')} / "
        f"{report.get('dlq')} / {report.get('unaccounted')} |\n"
        f"| online accuracy | {f'{accuracy:.2%}' if accuracy is not None else '-'} |\n"
        f"| latency p50 / p95 / p99 (ms) | {lat.get('p50')} / {lat.get('p95')} / "
        f"{lat.get('p99')} |\n"
        f"| label throughput | {report.get('label_fps')} frames/s |\n"
        f"| decoding in the replicas | {_decode_text(report)} |\n"
        f"| cameras' CPU (apart from the pipeline) | {_cameras_text(report)} |\n"
        f"| total time | {report.get('seconds')} s |\n\n"
        "![latency histogram](latency_histogram.png)\n\n"
        + ("The dashboard (`framecast dashboard`) at the end of the run:\n\n"
           "![dashboard](dashboard.png)\n\n"
           if (report.get("dashboard") or {}).get("screenshot") else "")
        + f"## Latency over the run ({WINDOW_S:g} s windows, by label time)\n\n"
        "| from (s) | frames | p50 (ms) | p99 (ms) |\n|---|---|---|---|\n"
        + "".join(
            f"| {w['from_s']:g} | {w['frames']} | {w['p50']} | {w['p99']} |\n" for w in windows
        )
    )


def _cameras_text(report: dict[str, Any]) -> str:
    text = f"{report.get('cameras_cpu_seconds')} s in all"
    if report.get("cameras_sending_cpu_s") is not None:
        text += f", {report['cameras_sending_cpu_s']:.1f} s sending"
    if report.get("cameras_prerender_s") is not None:
        text += f" (clips pre-rendered in {report['cameras_prerender_s']:.1f} s)"
    return text


def _model_text(report: dict[str, Any]) -> str:
    model = report.get("model") or {}
    return f"{model.get('name')} {model.get('version')} ({model.get('runtime')})"


def _print_summary(console: Console, report: dict[str, Any], out_dir: Path) -> None:
    table = Table(title="demo summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    lat = report.get("latency_ms", {})
    accuracy = report.get("online_accuracy")
    rows = [
        ("preset", f"{report.get('preset')} ({report.get('source')}, {report.get('encoding')}"
                   f"{', ' + report['frame_size'] if report.get('frame_size') else ''})"),
        ("model", _model_text(report)),
        ("cameras", f"{report['cameras']} at {report['fps_per_camera']:g} fps each"),
        ("frames sent / labelled", f"{report.get('frames_produced')} / {report.get('labels')}"),
        ("dropped (deadline) / DLQ", f"{report.get('dropped_deadline')} / {report.get('dlq')}"),
        ("unaccounted (lost)", str(report.get("unaccounted"))),
        ("label throughput", f"{report.get('label_fps')} frames/s"),
        ("latency p50 / p95 / p99", f"{lat.get('p50')} / {lat.get('p95')} / {lat.get('p99')} ms"),
        (
            f"p99 by {WINDOW_S:g} s of the run",
            " / ".join(f"{w['p99']:.0f}" for w in report.get("latency_ms_by_window", [])) + " ms",
        ),
        ("online accuracy (vs ground truth)", f"{accuracy:.2%}" if accuracy is not None else "-"),
        ("decoding in the replicas", _decode_text(report)),
        ("cameras' CPU (apart)", _cameras_text(report)),
        ("total time", f"{report.get('seconds')} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    console.print(
        f"report: {out_dir / 'demo.md'} (+ demo.json, latency_histogram.png"
        f"{', dashboard.png' if (out_dir / 'dashboard.png').exists() else ''})",
        highlight=False,
    )
