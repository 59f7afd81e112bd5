"""`framecast bench peers`: framecast beside what a user would build instead, on the same frames,
the same int8 model file and the same cores, in one run (issue 19).

Pipelines, each measured on its own fresh topics (frames, labels, latency, DLQ):

- ``framecast``: ``framecast stream run`` as a child process + the Serve app (one replica);
- ``floor``: ``peers/floor.py``, a bare confluent-kafka consumer with LiteRT in process;
- ``quix``: ``peers/quix_app.py`` (Quix Streams) in ``.venv-peers/quix``;
- ``bytewax`` or ``faust``: ``peers/<name>_app.py`` in ``.venv-peers/<name>``;
- ``http``: ``peers/http_cameras.py``, cameras POSTing frames to Serve's ``/classify``.

Two regimes (issue 19 item 2): 28x28 Fashion-MNIST frames (``framecast produce`` cameras,
models/fashion_mnist_stream), and with ``frame_size`` (``--frame-size WxH``) camera-size RGB
JPEG frames: the pre-encoded looped clips of :mod:`cluster.bench.camera` (what ``bench
pipeline --frame-size`` sends; the scenes generator's garments, ground truth in every frame)
through an RGB model (models/scenes); the HTTP cameras POST the same JPEGs.

The peers' command lines, READY line and final JSON line are peers/README.md's interface. A
pipeline whose program or venv is missing is reported as skipped with the reason.

For each pipeline, one process runs all of its measurements (start-up is not measured):
an unmeasured warm-up, a flat-out run (frames/s, and CPU seconds -> frames per CPU-second),
then steps at offered loads (cameras x fps, each a fixed number of seconds) that give p50/p99
end-to-end at fixed loads and the MLPerf-server-style capacity: the highest offered frames/s
whose p99 is within 15 ms (50 ms), every frame labelled. Steps are told apart by the frames'
capture times (each step waits for its labels before the next starts). The search is
:func:`capacity_search`, pure, over a ``measure(load)`` it is given.

CPU counted as the pipeline's: the broker's, plus the peer's process tree; for framecast the
classifier process and every process of the local Ray head (raylet, GCS, dashboard, Serve
controller, proxy, replicas); for http the Ray head's. The cameras are the load and are not
counted (for http the camera process also sends the requests and writes the labels).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
from rich.console import Console

from cluster import stack
from cluster.bench.camera import parse_frame_size, produce_clip_in_subprocess
from cluster.bench.runs import drop_topics, fresh_topics, label_summary, percentile, read_labels
from cluster.cameras import produce_in_subprocess
from cluster.exceptions import SettingsError
from cluster.settings import FramecastSettings
from jobs.machine import describe
from streams.topics import topic_names

ROOT = Path(__file__).resolve().parents[2]
STREAM_MODEL = ROOT / "models" / "fashion_mnist_stream"
PEERS_DIR = ROOT / "peers"
PEER_VENVS = ROOT / ".venv-peers"
# framecast-local: `stream run --local-model`, the model in the classifier's process (no Serve).
PIPELINES = ("framecast", "framecast-local", "floor", "quix", "bytewax", "faust", "http")
BOUNDS_MS = (15.0, 50.0)
MAX_FPS_PER_CAMERA = 30.0
CAMERA_FPS = 15.0  # the camera regime's cameras: 15 fps each (8 x 15 fps = 120 frames/s)
MAX_CAMERAS = 64
CpuSnapshot = dict[tuple[int, float], float]
# run_frames(cameras, fps, per_camera, batch) offers frames: (the cameras' frames/s or None,
# capture clock at start and at end (ns), the CPU snapshot when the load started or None).
RunFrames = Callable[[int, float, int, int], tuple[float | None, int, int, CpuSnapshot | None]]


# -- pure parts: the arithmetic and the capacity search ----------------------------------------


@dataclass
class Step:
    """One offered load held for a fixed time: what was offered, what came back."""

    offered_fps: float
    cameras: int
    fps_per_camera: float
    frames: int
    labelled: int
    p50_ms: float | None
    p99_ms: float | None
    produce_fps: float | None = None
    cpu_s: float | None = None
    note: str = ""

    @property
    def cameras_short(self) -> bool:
        """The cameras could not offer the load (under 90 % of it): nothing is learnt here."""
        return self.produce_fps is not None and self.produce_fps < 0.9 * self.offered_fps

    def passes(self, bound_ms: float) -> bool:
        """Every frame labelled, p99 within bound_ms, and the load really offered."""
        return (
            self.labelled >= self.frames > 0
            and self.p99_ms is not None
            and self.p99_ms <= bound_ms
            and not self.cameras_short
        )


def camera_split(offered_fps: float, max_fps: float = MAX_FPS_PER_CAMERA) -> tuple[int, float]:
    """(cameras, fps per camera) that offer offered_fps: cameras of at most max_fps (30), up
    to 64 of them (past 64 x max_fps each camera goes faster)."""
    if offered_fps <= 0:
        raise ValueError(f"offered load must be > 0 frames/s, got {offered_fps}")
    cameras = min(MAX_CAMERAS, max(1, math.ceil(offered_fps / max_fps - 1e-9)))
    return cameras, round(offered_fps / cameras, 3)


def ladder_loads(flat_out_fps: float | None, fixed: Iterable[float],
                 fractions: Iterable[float], lowest: float = 20.0) -> list[float]:
    """The loads a search climbs: the fixed loads, and fractions of the flat-out rate (not
    below `lowest`), ascending, without repeats."""
    loads = {round(float(x)) for x in fixed}
    if flat_out_fps:
        loads |= {round(max(lowest, f * flat_out_fps)) for f in fractions}
    return sorted(x for x in loads if x > 0)


@dataclass
class Capacity:
    """The search's answer for one p99 bound."""

    bound_ms: float
    fps: float | None  # highest passing offered load; None when none passed
    first_failing_fps: float | None  # lowest failing load above it; None: the ladder's top passed

    @property
    def note(self) -> str:
        if self.fps is None:
            return "no load passed (capacity below the lowest step)"
        if self.first_failing_fps is None:
            return "the ladder's highest load passed (capacity at least this)"
        return ""


@dataclass
class Search:
    steps: list[Step] = field(default_factory=list)
    capacity: dict[float, Capacity] = field(default_factory=dict)


def capacity_search(
    measure: Callable[[float], Step],
    ladder: list[float],
    *,
    bounds_ms: Iterable[float] = BOUNDS_MS,
    bisections: int = 2,
    resolution_fps: float = 5.0,
    retries: int = 0,
) -> Search:
    """MLPerf-server-style capacity for each p99 bound: climb the ladder (ascending) until a
    step fails the loosest bound, then for each bound bisect `bisections` times between its
    highest passing load and the lowest failing load above it. Each load is measured once
    (results are shared between bounds); bisection stops early within resolution_fps.

    ``retries``: a load that fails even the loosest bound is measured again up to this many
    times and the first passing measurement counts, so one stall (a GC pause, another process
    taking the core for 200 ms) does not end a pipeline's ladder. Every measurement is kept in
    ``steps``; the discarded ones say so in their note."""
    bounds = sorted(bounds_ms)
    done: dict[float, Step] = {}
    search = Search()

    def run(load: float) -> Step:
        if load not in done:
            step = measure(load)
            search.steps.append(step)
            for attempt in range(retries):
                if step.passes(bounds[-1]):
                    break
                step.note = (step.note + "; " if step.note else "") + (
                    f"failed, re-measured (retry {attempt + 1} of {retries})")
                step = measure(load)
                search.steps.append(step)
            done[load] = step
        return done[load]

    for load in sorted(ladder):
        if not run(load).passes(bounds[-1]):
            break
    for bound in bounds:
        passed = [x for x, s in done.items() if s.passes(bound)]
        low = max(passed) if passed else None
        above = [x for x, s in done.items() if not s.passes(bound) and (low is None or x > low)]
        high = min(above) if above else None
        for _ in range(bisections):
            if high is None:
                break
            bottom = low if low is not None else 0.0
            middle = float(round((bottom + high) / 2))
            if high - bottom <= resolution_fps or middle in (bottom, high) or middle <= 0:
                break
            if run(middle).passes(bound):
                low = middle
            else:
                high = middle
        search.capacity[bound] = Capacity(bound, low, high)
    return search


def cpu_used(before: dict[tuple[int, float], float], after: dict[tuple[int, float], float]
             ) -> float:
    """CPU seconds spent between two snapshots of {(pid, create time): CPU seconds}: a process
    new since `before` counts from zero; one gone by `after` is not counted (it cannot be
    read any more)."""
    return sum(max(0.0, seconds - before.get(key, 0.0)) for key, seconds in after.items())


def frames_per_cpu_second(frames: int, cpu_s: float | None) -> float | None:
    """Frames per CPU-second: the frames/s one fully busy core would give (None without CPU)."""
    if not cpu_s or cpu_s <= 0 or frames <= 0:
        return None
    return round(frames / cpu_s, 1)


def window(labels: Iterable[dict[str, Any]], start_ns: int, end_ns: int) -> list[dict[str, Any]]:
    """The labels of frames captured in [start_ns, end_ns], each frame once (at-least-once
    pipelines may label a frame twice: the first label counts)."""
    seen: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for label in labels:
        captured = label.get("captured_at_ns")
        if captured is None or not start_ns <= captured <= end_ns:
            continue
        seen.setdefault((label.get("stream_id"), label.get("frame_index"), captured), label)
    return list(seen.values())


def captured_rate(labels: list[dict[str, Any]]) -> float | None:
    """Frames/s the cameras really made: labels - 1 over the span of their capture times."""
    times = sorted(r["captured_at_ns"] for r in labels)
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return round((len(times) - 1) / ((times[-1] - times[0]) / 1e9), 1)


def ground_truth_accuracy(labels: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the ok labels: how many carry the frame's ground truth, and the share of those whose
    class is it (None without ground truth) - the cameras' frames have it in both regimes."""
    known = [r for r in labels
             if r.get("status", "ok") == "ok" and r.get("ground_truth") is not None]
    right = sum(r.get("class_id") == r["ground_truth"] for r in known)
    return {"ground_truth_labels": len(known),
            "flat_out_accuracy": round(right / len(known), 4) if known else None}


def latency_ms(labels: list[dict[str, Any]]) -> list[float]:
    """End-to-end ms of each ok label: labeled_at_ns - captured_at_ns."""
    return [(r["labeled_at_ns"] - r["captured_at_ns"]) / 1e6 for r in labels
            if r.get("status", "ok") == "ok"]


# -- processes and their CPU -----------------------------------------------------------------


def cpu_snapshot(processes: Iterable[psutil.Process]) -> dict[tuple[int, float], float]:
    """{(pid, create time): user + system CPU seconds, reaped children's included}."""
    out: dict[tuple[int, float], float] = {}
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            out[(proc.pid, proc.create_time())] = (
                t.user + t.system + t.children_user + t.children_system)
    return out


def tree(proc: psutil.Process | None) -> list[psutil.Process]:
    """A process and its descendants ([] once it is gone)."""
    if proc is None:
        return []
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


class Program:
    """A pipeline's program as a child process: stdout and stderr to files, READY awaited,
    SIGTERM at the end, its last JSON line of stdout read back."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.env = env
        self.child: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    def start(self) -> Program:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                      stderr=self._err, cwd=ROOT, env=self.env)
        return self

    @property
    def process(self) -> psutil.Process | None:
        if self.child is None:
            return None
        try:
            return psutil.Process(self.child.pid)
        except psutil.Error:
            return None

    def _read(self, handle: IO[bytes] | None) -> str:
        if handle is None:
            return ""
        handle.flush()
        handle.seek(0)
        return handle.read().decode(errors="replace")

    def stderr_tail(self) -> str:
        return self._read(self._err)[-1500:]

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Until ready() (or READY on stderr when ready is None); RuntimeError if the program
        exits first or takes longer than timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if self.child is None or self.child.poll() is not None:
                raise RuntimeError(f"{Path(self.argv[1]).name} exited before it was ready: "
                                   f"{self.stderr_tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"{Path(self.argv[1]).name} not ready within {timeout_s:.0f} s: "
                           f"{self.stderr_tail()}")

    def said_ready(self) -> bool:
        return "READY" in self._read(self._err)

    def wait(self, timeout_s: float) -> None:
        """Until the program exits by itself (subprocess.TimeoutExpired past timeout_s)."""
        if self.child is not None:
            self.child.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """SIGTERM (SIGKILL after timeout_s); the last JSON object line of its stdout, if any."""
        result: dict[str, Any] = {}
        if self.child is not None:
            if self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)
                try:
                    self.child.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.child.kill()
                    self.child.wait(timeout=10)
                    result["killed"] = True
            result["exit"] = self.child.returncode
            for line in reversed(self._read(self._out).splitlines()):
                if line.strip().startswith("{"):
                    with contextlib.suppress(ValueError):
                        result.update(json.loads(line))
                        break
        for handle in (self._out, self._err):
            if handle is not None:
                handle.close()
        return result


# -- the harness ------------------------------------------------------------------------------


@dataclass
class PeersOptions:
    """How long and how hard: --quick or the full run, in the 28x28 regime or (frame_size,
    (width, height)) the camera regime: JPEGs of tens of kB, flat out some hundreds of
    frames/s instead of thousands, so fewer frames, lower fixed loads, 15 fps cameras and
    flat-out messages of 16 frames (64 camera JPEGs would near the topic's message limit)."""

    quick: bool
    frame_size: tuple[int, int] | None = None
    warmup_frames: int = 0
    flat_frames: int = 0
    http_flat_frames: int = 0
    step_seconds: float = 0.0
    fixed_loads: tuple[float, ...] = ()
    fractions: tuple[float, ...] = ()
    bisections: int = 0
    drain_s: float = 0.0
    flat_batch: int = 0  # frames a message in the flat-out runs
    fps_per_camera: float = 0.0  # the most a camera offers in a step

    def __post_init__(self) -> None:
        camera = self.frame_size is not None
        if self.quick and camera:
            defaults: dict[str, Any] = dict(
                warmup_frames=200, flat_frames=1200, http_flat_frames=300, step_seconds=3.0,
                fixed_loads=(120.0,), fractions=(0.3, 0.6, 0.85), bisections=1, drain_s=20.0)
        elif camera:
            defaults = dict(
                warmup_frames=800, flat_frames=8000, http_flat_frames=2000, step_seconds=8.0,
                fixed_loads=(60.0, 120.0, 240.0), fractions=(0.1, 0.25, 0.5, 0.7, 0.85, 1.0),
                bisections=3, drain_s=45.0)
        elif self.quick:
            defaults = dict(
                warmup_frames=1000, flat_frames=6000, http_flat_frames=1200, step_seconds=3.0,
                fixed_loads=(120.0, 990.0), fractions=(0.3, 0.6, 0.85), bisections=1,
                drain_s=20.0)
        else:
            defaults = dict(
                warmup_frames=4000, flat_frames=40000, http_flat_frames=6000, step_seconds=8.0,
                fixed_loads=(120.0, 480.0, 990.0), fractions=(0.1, 0.25, 0.5, 0.7, 0.85, 1.0),
                bisections=3, drain_s=45.0)
        defaults |= dict(flat_batch=16 if camera else 64,
                         fps_per_camera=CAMERA_FPS if camera else MAX_FPS_PER_CAMERA)
        for key, value in defaults.items():
            if not getattr(self, key):
                setattr(self, key, value)


def peer_program(name: str) -> tuple[list[str] | None, str]:
    """(the interpreter and script of peer `name`, "") or (None, why it cannot run)."""
    script = PEERS_DIR / ("http_cameras.py" if name == "http" else
                          f"{name}.py" if name == "floor" else f"{name}_app.py")
    if not script.exists():
        return None, f"{script.relative_to(ROOT)} is missing"
    if name in ("floor", "http"):  # these run in framecast's own venv
        return [sys.executable, str(script)], ""
    python = PEER_VENVS / name / "bin" / "python"
    if not python.exists():
        return None, f"no {python.relative_to(ROOT)}: run `make peers`"
    return [str(python), str(script)], ""


class _Bench:
    """What every pipeline's measurements share: settings, broker, model, options, output."""

    def __init__(self, settings: FramecastSettings, artifact: Path, options: PeersOptions,
                 console: Console) -> None:
        self.settings = settings
        self.artifact = artifact
        self.options = options
        self.console = console
        self.bootstrap = stack.kafka_bootstrap(settings)
        info = None if settings.kafka.bootstrap_servers else stack.embedded_kafka(settings).info()
        self.broker = psutil.Process(info.pid) if info else None
        self.ray_local = not settings.ray.address
        self.cameras: dict[str, Any] = {}  # what the camera regime's clip cameras said of it

    def ray_processes(self) -> list[psutil.Process]:
        return stack.local_ray_head(self.settings).processes() if self.ray_local else []

    def cli(self) -> list[str]:
        """`framecast` as a child process of this stack (the settings' home and broker)."""
        argv = [sys.executable, "-m", "cluster.cli", "--home", str(self.settings.home),
                "--bootstrap-servers", self.bootstrap]
        if self.settings.ray.address:
            argv += ["--ray-address", self.settings.ray.address]
        return argv

    def labels_for(self, topic: str, state: dict[str, int], start_ns: int, end_ns: int,
                   frames: int, timeout_s: float) -> list[dict[str, Any]]:
        """The labels of the frames captured in [start_ns, end_ns], waiting up to timeout_s for
        all `frames` of them. state["read"]: labels on the topic before this step."""
        deadline = time.monotonic() + timeout_s
        want = frames
        while True:
            labels = read_labels(self.settings, self.bootstrap, topic, state["read"] + want,
                                 timeout_s=max(1.0, deadline - time.monotonic()))
            mine = window(labels, start_ns, end_ns)
            if len(mine) >= frames or time.monotonic() >= deadline:
                state["read"] = len(labels)
                return mine
            want += frames - len(mine)  # stragglers of an earlier step took some of the count


def _step_result(load: float, cameras: int, fps: float, frames: int,
                 labels: list[dict[str, Any]], produce_fps: float | None,
                 cpu_s: float | None) -> Step:
    e2e = latency_ms(labels)
    return Step(offered_fps=round(cameras * fps, 1), cameras=cameras, fps_per_camera=fps,
                frames=frames, labelled=len(labels), p50_ms=percentile(e2e, 50),
                p99_ms=percentile(e2e, 99), produce_fps=produce_fps,
                cpu_s=None if cpu_s is None else round(cpu_s, 2),
                note="" if len(labels) >= frames else f"{frames - len(labels)} frames unlabelled")


def _measure_pipeline(
    bench: _Bench, name: str, *, counted: Callable[[], list[psutil.Process]],
    run_frames: RunFrames,
    labels_topic: str, flat_frames: int,
) -> dict[str, Any]:
    """Warm-up, flat out, then the capacity search, for one running pipeline.

    run_frames: see RunFrames."""
    options = bench.options
    state = {"read": 0}

    def offer(cameras: int, fps: float, per_camera: int, batch: int,
              ) -> tuple[list[dict[str, Any]], float | None, float, int]:
        before = cpu_snapshot(counted())
        produce_fps, start_ns, end_ns, started = run_frames(cameras, fps, per_camera, batch)
        frames = cameras * per_camera
        labels = bench.labels_for(labels_topic, state, start_ns, end_ns, frames,
                                  timeout_s=options.drain_s + (0 if fps else 120))
        if started is not None:
            before = started
        if produce_fps is None and fps:
            produce_fps = captured_rate(labels)
        return labels, produce_fps, cpu_used(before, cpu_snapshot(counted())), frames

    batch = options.flat_batch
    offer(4, 0, max(1, options.warmup_frames // 4), batch)  # not measured: JIT, caches, pools
    labels, produce_fps, cpu_s, frames = offer(4, 0, flat_frames // 4, batch)
    flat = label_summary(labels)
    truth = ground_truth_accuracy(labels)
    result: dict[str, Any] = {
        "name": name,
        "frames": frames,
        "labelled": len(labels),
        "frames_per_s": flat["sustained_fps"],
        "cpu_s": round(cpu_s, 2),
        "frames_per_s_per_core": frames_per_cpu_second(len(labels), cpu_s),
        "flat_out_p50_ms": flat["p50_ms"],
        "flat_out_p99_ms": flat["p99_ms"],
        "cameras_fps_flat_out": produce_fps,
        **truth,
    }
    bench.console.print(
        f"  {name}: flat out {result['frames_per_s']} frames/s, {result['cpu_s']} CPU s for "
        f"{len(labels)}/{frames} frames = {result['frames_per_s_per_core']} frames per "
        "CPU-second", highlight=False)

    def measure(load: float) -> Step:
        cameras, fps = camera_split(load, options.fps_per_camera)
        per_camera = max(1, round(fps * options.step_seconds))
        got, produced, used, total = offer(cameras, fps, per_camera, 1)
        step = _step_result(load, cameras, fps, total, got, produced, used)
        bench.console.print(
            f"    {name} {cameras}x{fps:g} fps ({step.offered_fps:g} offered): "
            f"{step.labelled}/{step.frames} labelled, p50 {step.p50_ms} ms, p99 {step.p99_ms} ms"
            + (f", cameras only {produced} frames/s" if step.cameras_short else ""),
            highlight=False)
        return step

    ladder = ladder_loads(result["frames_per_s"], options.fixed_loads, options.fractions)
    search = capacity_search(measure, ladder, bisections=options.bisections, retries=1)
    fixed = {round(x) for x in options.fixed_loads}
    result["loads"] = [
        {"offered_fps": s.offered_fps, "cameras": s.cameras, "fps_per_camera": s.fps_per_camera,
         "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "frames": s.frames, "labelled": s.labelled,
         "cpu_s": s.cpu_s, "note": s.note}
        for s in sorted(search.steps, key=lambda s: s.offered_fps) if round(s.offered_fps) in fixed
    ]
    result["loads_not_run"] = sorted(
        x for x in fixed if all(round(s.offered_fps) != x for s in search.steps))
    for bound, capacity in search.capacity.items():
        key = f"capacity_fps_p99_{bound:g}ms"
        result[key] = capacity.fps
        result[f"{key}_note"] = capacity.note
    result["steps"] = [asdict(s) | {"passes_ms": [b for b in BOUNDS_MS if s.passes(b)]}
                       for s in search.steps]
    bench.console.print(
        f"  {name}: capacity {result['capacity_fps_p99_15ms']} frames/s at p99 <= 15 ms, "
        f"{result['capacity_fps_p99_50ms']} at p99 <= 50 ms", highlight=False)
    return result


@contextlib.contextmanager
def _topics(bench: _Bench) -> Iterator[dict[str, str]]:
    topics = fresh_topics(bench.settings, bench.bootstrap, partitions=4)
    names = topic_names(topics)
    try:
        yield names
    finally:
        with contextlib.suppress(Exception):
            drop_topics(bench.settings, bench.bootstrap, names)


def _kafka_cameras(bench: _Bench, topic: str
                   ) -> RunFrames:
    """The cameras every Kafka pipeline gets: ``framecast produce`` of Fashion-MNIST frames,
    or in the camera regime the looped pre-encoded JPEG clips of cluster.bench.camera."""
    frame_size = bench.options.frame_size

    def run(cameras: int, fps: float, per_camera: int, batch: int
            ) -> tuple[float | None, int, int, CpuSnapshot | None]:
        start = time.time_ns()
        if frame_size is None:
            produced = produce_in_subprocess(bench.settings, bench.bootstrap, topic,
                                             cameras=cameras, fps=fps, per_camera=per_camera,
                                             batch=batch)
        else:
            produced = produce_clip_in_subprocess(
                bench.settings, bench.bootstrap, topic, frame_size=frame_size, cameras=cameras,
                fps=fps, per_camera=per_camera, batch=batch)
            bench.cameras.update({k: produced[k] for k in (
                "frame_size", "clip", "jpeg_bytes_mean", "ground_truth") if k in produced})
        return produced.get("fps"), start, time.time_ns(), None

    return run


def _kafka_pipeline(bench: _Bench, name: str, argv: list[str] | None) -> dict[str, Any]:
    """framecast's stream classifier (argv None; `framecast-local`: with the model in its own
    process) or a Kafka peer, measured on fresh topics."""
    from streams.client import admin_client
    from streams.exceptions import StreamsError

    with _topics(bench) as names, contextlib.ExitStack() as cleanup:
        group = f"bench-{name}-{names['frames']}"
        if argv is None:
            program = Program([*bench.cli(), "stream", "run", "--frames", names["frames"],
                               "--labels", names["labels"], "--latency", names["latency"],
                               "--dlq", names["dlq"], "--group", group,
                               "--idle-exit-s", "900",
                               *(["--local-model", str(bench.artifact)]
                                 if name == "framecast-local" else [])])
            admin = cleanup.enter_context(admin_client(bench.settings.kafka, bench.bootstrap))

            def ready() -> bool:
                try:  # a fresh broker's group coordinator may not answer yet
                    info = admin.describe_group(group)
                except StreamsError:
                    return False
                return info.state == "stable" and bool(info.members)
        else:
            model = bench.artifact / "model.tflite"
            program = Program([*argv, "--bootstrap", bench.bootstrap, "--frames",
                               names["frames"], "--labels", names["labels"], "--group", group,
                               "--model", str(model), "--max-frames", str(10**9)])
            ready = program.said_ready
        program.start()
        outcome: dict[str, Any] = {}
        cleanup.callback(lambda: outcome.update(program.stop()))
        program.wait_ready(ready, timeout_s=180)

        def counted() -> list[psutil.Process]:
            own = tree(program.process)
            return [*own, *([bench.broker] if bench.broker else []),
                    *(bench.ray_processes() if name == "framecast" else [])]

        result = _measure_pipeline(bench, name, counted=counted,
                                   run_frames=_kafka_cameras(bench, names["frames"]),
                                   labels_topic=names["labels"],
                                   flat_frames=bench.options.flat_frames)
    result["program"] = {k: v for k, v in outcome.items() if k in ("exit", "killed", "cpu_s",
                                                                  "labelled")}
    return result


def _http_pipeline(bench: _Bench, argv: list[str]) -> dict[str, Any]:
    """Cameras POSTing frames to Serve's /classify (PNG; in the camera regime the same JPEG
    clips as the Kafka cameras); each step a run of the camera program."""
    serve = bench.settings.serve
    url = serve.http_url + serve.route_prefix.rstrip("/") + "/classify"
    env = dict(os.environ)
    token: list[str] = []
    if serve.http_token is not None:  # passed by name: never on a command line
        env["FRAMECAST_BENCH_HTTP_TOKEN"] = serve.http_token.get_secret_value()
        token = ["--token-env", "FRAMECAST_BENCH_HTTP_TOKEN"]
    size = bench.options.frame_size
    frames = [] if size is None else ["--frame-size", f"{size[0]}x{size[1]}"]
    with _topics(bench) as names:
        def run(cameras: int, fps: float, per_camera: int, _batch: int
                ) -> tuple[float | None, int, int, CpuSnapshot | None]:
            program = Program([*argv, "--url", url, "--bootstrap", bench.bootstrap, "--labels",
                               names["labels"], "--cameras", str(cameras), "--fps", str(fps),
                               "--per-camera", str(per_camera), *frames, *token], env=env)
            start = time.time_ns()
            program.start()
            try:  # CPU from when its cameras start: its start-up is not the pipeline's
                program.wait_ready(program.said_ready, timeout_s=120)
                started = cpu_snapshot(counted())
                program.wait(timeout_s=900)
            finally:
                outcome = program.stop()
            if outcome.get("exit"):
                raise RuntimeError(f"http_cameras.py failed (exit {outcome['exit']})")
            return None, start, time.time_ns(), started  # its rate: from the capture times

        def counted() -> list[psutil.Process]:
            return [*([bench.broker] if bench.broker else []), *bench.ray_processes()]

        return _measure_pipeline(bench, "http", counted=counted, run_frames=run,
                                 labels_topic=names["labels"],
                                 flat_frames=bench.options.http_flat_frames)


def chosen_pipelines(only: str | None) -> tuple[str, ...]:
    """The pipelines named in `only` (comma-separated), in run order; all when None."""
    if only is None:
        return PIPELINES
    names = {n.strip() for n in only.split(",") if n.strip()}
    unknown = sorted(names - set(PIPELINES))
    if unknown or not names:
        raise SettingsError(f"--pipelines: unknown {', '.join(unknown) or 'empty list'}; "
                        f"expected some of {', '.join(PIPELINES)}")
    return tuple(n for n in PIPELINES if n in names)


def bench_peers(settings: FramecastSettings, artifact: Path | None, console: Console, *,
                quick: bool, command: str = "", only: str | None = None,
                frame_size: str | None = None) -> dict[str, Any]:
    """Every pipeline's (or those in `only`) flat-out frames/s, frames per CPU-second,
    p50/p99 at fixed loads and capacity at p99 <= 15 / 50 ms, on the running stack.

    frame_size (``WxH``): the camera regime - RGB JPEG clips of that size through an RGB
    model (default models/scenes, else the bench's random-weight RGB model); None: 28x28
    Fashion-MNIST frames through models/fashion_mnist_stream."""
    wanted = chosen_pipelines(only)
    try:
        size = None if frame_size is None else parse_frame_size(frame_size)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown

    if size is None:
        artifact = artifact or STREAM_MODEL
    else:
        from cluster.bench.pipeline import rgb_artifact

        artifact = rgb_artifact(settings, artifact, log=lambda line: console.print(line))
    options = PeersOptions(quick=quick, frame_size=size)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": describe(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command, "artifact": str(artifact), "quick": quick,
        "frame_size": None if size is None else f"{size[0]}x{size[1]}",
        "frames": "28x28 Fashion-MNIST frames (framecast produce)" if size is None else
                  f"{size[0]}x{size[1]} RGB JPEG camera frames (pre-encoded looped clips, "
                  f"cameras of at most {options.fps_per_camera:g} fps)",
        "options": asdict(options), "pipelines": [],
        "counted_cpu": "the broker + the pipeline's processes (framecast: the classifier "
                       "process and every process of the local Ray head; framecast-local: the "
                       "classifier process; http: the Ray head's; peers: the peer's process "
                       "tree); the cameras are the load, not counted",
    }
    bench = _Bench(settings, artifact, options, console)
    if bench.broker is None or not bench.ray_local:
        results["notes"] = ["an external Kafka or Ray cluster: its CPU is not counted"]
    by_name: dict[str, dict[str, Any]] = {}

    def attempt(name: str, run: Callable[[], dict[str, Any]]) -> None:
        console.rule(f"{name}", style="dim")
        clock = time.perf_counter()
        try:
            by_name[name] = run()
        except Exception as error:  # one pipeline failing does not end the run
            by_name[name] = {"name": name, "error": f"{type(error).__name__}: {error}"[:2000]}
            console.print(f"  {name} failed: {by_name[name]['error']}", highlight=False)
        by_name[name]["seconds"] = round(time.perf_counter() - clock, 1)

    kafka_ok = settings.kafka.security_protocol == "PLAINTEXT"
    serves = bool({"framecast", "http"} & set(wanted))  # the others need no Serve replica
    with stack.ray_connection(settings):
        serve_settings = settings.serve.model_copy(
            update={"num_cpus": 1.0, "min_replicas": 1, "max_replicas": 1})
        if serves:
            deploy(artifact, serve_settings, address=None, namespace=settings.ray.namespace)
        bench.settings = settings.model_copy(update={"serve": serve_settings})
        if "framecast" in wanted:
            attempt("framecast", lambda: _kafka_pipeline(bench, "framecast", None))
        http_argv, why = peer_program("http")
        if "http" not in wanted:
            pass
        elif http_argv is None:
            by_name["http"] = {"name": "http", "skipped": why}
        else:
            attempt("http", lambda: _http_pipeline(bench, http_argv))
        if serves:
            serve_shutdown(serve_settings.app_name, address=None,
                           namespace=settings.ray.namespace)
        # The peers (and framecast with its model in process) run with no Serve replica
        # beside them.
        if "framecast-local" in wanted:
            attempt("framecast-local", lambda: _kafka_pipeline(bench, "framecast-local", None))
        others = [n for n in wanted if n not in ("framecast", "framecast-local", "http")]
        for name in others:
            argv, why = peer_program(name)
            if name == "faust" and "bytewax" in by_name and "skipped" not in by_name["bytewax"]:
                continue  # one of bytewax or faust is enough
            if argv is None:
                by_name[name] = {"name": name, "skipped": why}
            elif not kafka_ok:
                by_name[name] = {"name": name, "skipped": "the peers speak PLAINTEXT Kafka only"}
            else:
                attempt(name, functools.partial(_kafka_pipeline, bench, name, argv))
    if "bytewax" in by_name and "faust" in by_name and "skipped" in by_name["faust"] \
            and "skipped" in by_name["bytewax"]:
        by_name["bytewax"]["skipped"] += f"; faust: {by_name.pop('faust')['skipped']}"
    elif "faust" in by_name and "skipped" in by_name["faust"]:
        by_name.pop("faust")
    elif "faust" in by_name and "skipped" in by_name.get("bytewax", {}):
        by_name.pop("bytewax")  # faust ran in its place
    results["pipelines"] = [by_name[n] for n in PIPELINES if n in by_name]
    for row in results["pipelines"]:
        if "skipped" in row:
            console.print(f"  {row['name']}: skipped ({row['skipped']})", highlight=False)
    if bench.cameras:
        results["cameras"] = bench.cameras
        results["frames"] += (f"; clip: {bench.cameras.get('clip')}, "
                              f"{bench.cameras.get('jpeg_bytes_mean')} bytes a JPEG on average")
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    return results
