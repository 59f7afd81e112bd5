"""`framecast bench autoscale`: Serve replicas scaled on Kafka lag, through a burst.

The shipped model is deployed with the lag policy (serving.autoscale, min..max replicas); a
real ``framecast stream run`` process consumes the frames topic; once it owns its partitions,
``framecast produce`` sends a burst flat out (far faster than one replica labels). A sampler
records, every half second, the group's lag and the oldest unlabelled frame's age (the same
reader the policy runs in the Serve controller), the replicas running and the labels written
per second, until every frame is labelled and the app is back to min_replicas.

Reported: time to the first scale-up and to the peak replica count, peak lag, time to drain
(lag back to 0) and time back to min_replicas, all from the start of the burst; the timeline
as JSON, a PNG and Markdown.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cluster import stack
from cluster.bench.runs import drop_topics, fresh_topics
from cluster.cameras import produce_in_subprocess
from cluster.settings import FramecastSettings
from jobs.machine import describe, provenance, write_report
from streams.topics import topic_names

APP = "bench-autoscale"
PARTITIONS = 4
SAMPLE_S = 0.5


def _replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    states = status.deployments["Classifier"].replica_states
    return sum(n for s, n in states.items() if str(getattr(s, "value", s)) == "RUNNING")


def _labelled(admin: Any, topic: str, partitions: int) -> int:
    """Labels written so far: the sum of the labels topic's end offsets."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    latest = OffsetSpec.latest()
    futures = admin.list_offsets(
        {TopicPartition(topic, p): latest for p in range(partitions)}, request_timeout=5
    )
    return sum(int(f.result(5).offset) for f in futures.values())


class Sampler(threading.Thread):
    """The timeline: (t, lag, age_s, replicas, labelled, labelled_fps) every SAMPLE_S."""

    def __init__(self, settings: FramecastSettings, bootstrap: str, names: dict[str, str],
                 group: str, app: str) -> None:
        super().__init__(daemon=True, name="autoscale-sampler")
        from confluent_kafka.admin import AdminClient

        from serving.kafka_lag import LagReader, LagTarget

        self.reader = LagReader(LagTarget(bootstrap, group, names["frames"]), SAMPLE_S / 2)
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.names, self.app = names, app
        self.t0 = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                reading = self.reader.latest()
                labelled = _labelled(self.admin, self.names["labels"], PARTITIONS)
                now = time.monotonic() - self.t0
                previous = self.rows[-1] if self.rows else None
                fps = ((labelled - previous["labelled"]) / (now - previous["t"])
                       if previous and now > previous["t"] else 0.0)
                self.rows.append({
                    "t": round(now, 2), "lag": reading.lag if reading else None,
                    "age_s": reading.age_s if reading else None,
                    "replicas": _replicas(self.app), "labelled": labelled,
                    "labelled_fps": round(fps, 1),
                })
                self.halt.wait(SAMPLE_S)
        except BaseException as error:  # reported by the bench
            self.error = error
        finally:
            self.reader.stop()

    def stop(self) -> list[dict[str, Any]]:
        self.halt.set()
        self.join(30)
        if self.error is not None:
            raise self.error
        return self.rows


def summarize(rows: list[dict[str, Any]], burst_at: float, min_replicas: int,
              total: int) -> dict[str, Any]:
    """The figures of a timeline, in seconds from the burst's start."""
    after = [r for r in rows if r["t"] >= burst_at]
    peak_lag_row = max(after, key=lambda r: r["lag"] or 0, default=None)
    peak_replicas = max((r["replicas"] for r in after), default=0)

    def first(pred: Any, rows_: list[dict[str, Any]]) -> float | None:
        hit = next((r for r in rows_ if pred(r)), None)
        return round(hit["t"] - burst_at, 2) if hit else None

    drained_from = [r for r in after if peak_lag_row and r["t"] >= peak_lag_row["t"]]
    drain = first(lambda r: r["lag"] == 0 and r["labelled"] >= total, drained_from)
    drained_rows = [r for r in after if drain is not None and r["t"] - burst_at >= drain]
    return {
        "peak_lag": peak_lag_row["lag"] if peak_lag_row else None,
        "peak_lag_at_s": round(peak_lag_row["t"] - burst_at, 2) if peak_lag_row else None,
        "peak_replicas": peak_replicas,
        "time_to_first_scale_up_s": first(lambda r: r["replicas"] > min_replicas, after),
        "time_to_peak_replicas_s": first(lambda r: r["replicas"] >= peak_replicas, after),
        "time_to_drain_s": drain,
        # Back at min: after the last time it held its peak (not before a late scale-up).
        "time_back_to_min_s": first(lambda r: r["replicas"] <= min_replicas, [
            r for r in drained_rows
            if peak_replicas > min_replicas and r["t"] >= max(
                (x["t"] for x in after if x["replicas"] >= peak_replicas), default=0.0)]),
        "peak_labelled_fps": max((r["labelled_fps"] for r in after), default=0.0),
    }


def bench_autoscale(
    settings: FramecastSettings, artifact: Path, console: Console, *, quick: bool
) -> dict[str, Any]:
    """Deploy with the lag policy, burst, record the timeline until back to min replicas."""
    import ray

    from cluster.bench.scaling import _group_members, classifier_argv
    from serving.deploy import deploy
    from serving.deploy import shutdown as serve_shutdown

    bootstrap = stack.kafka_bootstrap(settings)
    frames = 40_000 if quick else 150_000
    max_replicas = 3 if quick else 4
    delays = (2.0, 10.0) if quick else (5.0, 30.0)
    target_lag = 1000 if quick else 2000
    log_dir = settings.home / "reports" / "bench" / "autoscale-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    names = topic_names(fresh_topics(settings, bootstrap, partitions=PARTITIONS))
    group = f"autoscale-{names['frames']}"
    results: dict[str, Any] = {"machine": describe(), "artifact": str(artifact)}
    child: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    with stack.ray_connection(settings):
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        serve_settings = settings.serve.model_copy(update={
            "app_name": APP, "route_prefix": f"/{APP}", "min_replicas": 1,
            "max_replicas": max_replicas, "num_cpus": min(1.0, cpus / max_replicas),
            "autoscale_on": "lag", "lag_bootstrap_servers": bootstrap, "lag_group": group,
            "lag_topic": names["frames"], "lag_target_per_replica": target_lag,
            "upscale_delay_s": delays[0], "downscale_delay_s": delays[1],
        })
        results["policy"] = {
            "min_replicas": 1, "max_replicas": max_replicas, "num_cpus_per_replica":
            serve_settings.num_cpus, "lag_target_per_replica": target_lag,
            "lag_target_age_s": serve_settings.lag_target_age_s,
            "upscale_delay_s": delays[0], "downscale_delay_s": delays[1],
            "poll_interval_s": serve_settings.lag_poll_interval_s,
        }
        deploy(artifact, serve_settings, address=None, namespace=settings.ray.namespace)
        log_path = log_dir / f"{names['frames']}.log"
        try:
            with log_path.open("wb") as log:
                child = subprocess.Popen(
                    classifier_argv(settings, bootstrap, names, group, 0, app=APP),
                    stdout=subprocess.PIPE, stderr=log,
                )
            deadline = time.monotonic() + 240
            while _group_members(settings, bootstrap, group) < 1:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the classifier did not join: "
                                       + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.5)
            sampler = Sampler(settings, bootstrap, names, group, APP)
            sampler.start()
            time.sleep(3)  # a few samples at rest
            burst_at = time.monotonic() - sampler.t0
            console.print(f"  burst: {frames} frames flat out into {names['frames']}",
                          highlight=False)
            produced = produce_in_subprocess(settings, bootstrap, names["frames"], cameras=8,
                                             fps=0, per_camera=frames // 8, batch=1)
            total = (frames // 8) * 8
            deadline = time.monotonic() + (600 if quick else 1200)
            drained_at: float | None = None
            while time.monotonic() < deadline:
                rows = sampler.rows
                if rows and rows[-1]["labelled"] >= total and rows[-1]["lag"] == 0:
                    drained_at = drained_at or time.monotonic()
                    scaled = any(r["replicas"] > 1 for r in rows)
                    # Back at min after having scaled up; or, if it never did, long enough
                    # after the drain for a late scale-up (replicas Serve asked for during
                    # the burst can start after it) and its downscale to show.
                    if (scaled and rows[-1]["replicas"] <= 1) or (
                            not scaled and time.monotonic() - drained_at
                            > serve_settings.downscale_delay_s + 30):
                        break
                time.sleep(1)
            time.sleep(2)
            timeline = sampler.stop()
            sampler = None
        finally:
            if sampler is not None:
                sampler.halt.set()
            if child is not None:
                child.terminate()
                try:
                    child.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(30)
            serve_shutdown(APP, address=None, namespace=settings.ray.namespace)
            drop_topics(settings, bootstrap, names)
    results.update(
        frames=total, produce_fps=produced.get("fps"), burst_at_s=round(burst_at, 2),
        timeline=timeline, summary=summarize(timeline, burst_at, 1, total),
        loadavg_after=describe()["loadavg"],
    )
    s = results["summary"]
    console.print(
        f"  peak lag {s['peak_lag']} at {s['peak_lag_at_s']} s; replicas 1 -> "
        f"{s['peak_replicas']} (first scale-up {s['time_to_first_scale_up_s']} s, peak "
        f"{s['time_to_peak_replicas_s']} s); drained {s['time_to_drain_s']} s; back to 1 "
        f"{s['time_back_to_min_s']} s", highlight=False)
    return results


def markdown(results: dict[str, Any], command: str) -> str:
    """The bench autoscale section."""
    s, p = results["summary"], results["policy"]

    def f(value: Any) -> str:
        return "–" if value is None else str(value)

    lines = [
        "# framecast bench autoscale", "",
        *provenance(command, results["machine"], results["loadavg_after"]),
        f"Serve replicas scaled on Kafka lag (`serve deploy --autoscale-on lag`): "
        f"{p['min_replicas']}..{p['max_replicas']} replicas of {p['num_cpus_per_replica']:g} "
        f"CPU, {p['lag_target_per_replica']} frames of lag per replica, one more past "
        f"{p['lag_target_age_s']:g} s of oldest-frame age, up/down delays "
        f"{p['upscale_delay_s']:g}/{p['downscale_delay_s']:g} s, lag read every "
        f"{p['poll_interval_s']:g} s. One `framecast stream run`; a burst of "
        f"{results['frames']} frames produced flat out ({f(results['produce_fps'])} frames/s). "
        "Times from the start of the burst.", "",
        "| figure | value |", "|---|---|",
        f"| peak lag (frames) | {f(s['peak_lag'])} at {f(s['peak_lag_at_s'])} s |",
        f"| replicas | 1 -> {s['peak_replicas']} |",
        f"| time to first scale-up | {f(s['time_to_first_scale_up_s'])} s |",
        f"| time to peak replicas | {f(s['time_to_peak_replicas_s'])} s |",
        f"| time to drain (lag 0, every frame labelled) | {f(s['time_to_drain_s'])} s |",
        f"| time back to min replicas | {f(s['time_back_to_min_s'])} s |",
        f"| peak labelled frames/s | {s['peak_labelled_fps']} |", "",
        "![timeline](bench-autoscale.png)", "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Lag and replicas over time (top), labelled frames/s (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["timeline"]
    t = [r["t"] - results["burst_at_s"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [r["lag"] or 0 for r in rows], color="tab:red", label="lag (frames)")
    top.set_ylabel("consumer-group lag (frames)")
    right = top.twinx()
    right.step(t, [r["replicas"] for r in rows], where="post", color="tab:blue",
               label="replicas")
    right.set_ylabel("Serve replicas running")
    right.set_ylim(0, results["policy"]["max_replicas"] + 1)
    top.legend(loc="upper left")
    right.legend(loc="upper right")
    bottom.plot(t, [r["labelled_fps"] for r in rows], color="tab:green")
    bottom.set_ylabel("labelled frames/s")
    bottom.set_xlabel("seconds from the start of the burst")
    top.set_title("framecast bench autoscale: Serve replicas on Kafka lag")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: Path, results: dict[str, Any], command: str) -> list[Path]:
    """bench-autoscale.json, .md and .png."""
    return write_report(out_dir, "bench-autoscale", results, markdown(results, command), plot)


def run_cli(settings: FramecastSettings, artifact: Path, console: Console, *, quick: bool,
            out_dir: Path) -> list[Path]:
    """What `framecast bench autoscale` does: the stack up for the run, the outputs written."""
    command = "framecast " + " ".join(sys.argv[1:])
    with contextlib.ExitStack() as session:
        with console.status("starting the embedded stack..."):
            session.enter_context(stack.session(settings))
        console.rule(f"framecast bench autoscale{' (quick)' if quick else ''}")
        results = bench_autoscale(settings, artifact, console, quick=quick)
    return write_outputs(out_dir, results, command)
