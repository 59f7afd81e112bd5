"""`framecast bench peers`' pure parts: the capacity search, the per-core arithmetic, the
offered-load split, the step windows, and the report it writes."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from cluster.bench import peers
from cluster.bench.peers import (
    Step,
    camera_split,
    capacity_search,
    cpu_snapshot,
    cpu_used,
    frames_per_cpu_second,
    ladder_loads,
    latency_ms,
    window,
)
from cluster.bench.report import headline, peers_markdown, write_peers_outputs


def pipeline_with_knee(knee_15: float, knee_50: float, log: list[float] | None = None):
    """A fake pipeline: p99 10 ms up to knee_15, 40 ms up to knee_50, then 500 ms."""

    def measure(load: float) -> Step:
        if log is not None:
            log.append(load)
        p99 = 10.0 if load <= knee_15 else 40.0 if load <= knee_50 else 500.0
        cameras, fps = camera_split(load)
        return Step(load, cameras, fps, frames=100, labelled=100, p50_ms=p99 / 2, p99_ms=p99)

    return measure


def test_capacity_search_brackets_each_bound_and_bisects_between():
    log: list[float] = []
    search = capacity_search(pipeline_with_knee(330, 700, log), [100, 200, 400, 800, 1600],
                             bisections=3)
    # The ladder stops at the first load failing the loosest bound (800); 1600 is never run.
    assert 1600 not in log
    assert log[:4] == [100, 200, 400, 800]
    c15, c50 = search.capacity[15.0], search.capacity[50.0]
    assert 200 <= c15.fps <= 330 < c15.first_failing_fps <= 400
    assert 400 <= c50.fps <= 700 < c50.first_failing_fps <= 800
    # Three bisections each narrow the 200-400 and 400-800 brackets to an eighth.
    assert c15.first_failing_fps - c15.fps == 25
    assert c50.first_failing_fps - c50.fps == 50
    assert len(log) == len(set(log)) == 4 + 3 + 3  # every load measured once


def test_capacity_search_reuses_the_ladder_and_notes_open_ends():
    log: list[float] = []
    top_passes = capacity_search(pipeline_with_knee(10_000, 10_000, log), [100, 200],
                                 bisections=2)
    assert top_passes.capacity[50.0].fps == 200
    assert top_passes.capacity[50.0].first_failing_fps is None
    assert "at least" in top_passes.capacity[50.0].note
    assert log == [100, 200]

    none_pass = capacity_search(pipeline_with_knee(0, 0), [100, 200], bisections=1)
    assert none_pass.capacity[15.0].fps is None
    assert "below the lowest" in none_pass.capacity[15.0].note
    # It still bisects below the lowest failing load (50 and 25: they fail too).
    assert [s.offered_fps for s in none_pass.steps] == [100, 50, 25]


def test_capacity_search_re_measures_a_failing_load_so_one_stall_does_not_end_the_ladder():
    log: list[float] = []
    smooth = pipeline_with_knee(330, 700)
    stalls = {200.0}  # the first measurement at 200 frames/s stalls (p99 266 ms)

    def measure(load: float) -> Step:
        log.append(load)
        if load in stalls:
            stalls.discard(load)
            return Step(load, *camera_split(load), frames=100, labelled=100, p50_ms=5.0,
                        p99_ms=266.0)
        return smooth(load)

    search = capacity_search(measure, [100, 200, 400, 800], bisections=0, retries=1)
    assert log == [100, 200, 200, 400, 800, 800]  # 800 fails twice: a real knee, not a stall
    assert search.capacity[50.0].fps == 400 and search.capacity[15.0].fps == 200
    retried = [s for s in search.steps if "re-measured" in s.note]
    assert [s.offered_fps for s in retried] == [200, 800]

    without = capacity_search(pipeline_with_knee(330, 700), [100, 200, 400], retries=0)
    assert not any("re-measured" in s.note for s in without.steps)


def test_capacity_search_stops_bisecting_at_the_resolution():
    log: list[float] = []
    capacity_search(pipeline_with_knee(103, 103, log), [100, 108], bisections=5,
                    resolution_fps=10)
    assert log == [100, 108]  # 8 frames/s apart: nothing to gain


def test_a_step_passes_only_with_every_frame_labelled_and_the_load_really_offered():
    ok = Step(300, 10, 30.0, frames=900, labelled=900, p50_ms=3, p99_ms=14.9, produce_fps=299)
    assert ok.passes(15) and ok.passes(50)
    assert not ok.passes(14)
    missing = Step(300, 10, 30.0, frames=900, labelled=899, p50_ms=3, p99_ms=5)
    assert not missing.passes(50)
    short = Step(300, 10, 30.0, frames=900, labelled=900, p50_ms=3, p99_ms=5, produce_fps=200)
    assert short.cameras_short and not short.passes(50)
    empty = Step(300, 10, 30.0, frames=0, labelled=0, p50_ms=None, p99_ms=None)
    assert not empty.passes(50)


@pytest.mark.parametrize(("offered", "cameras", "fps"), [
    (20, 1, 20.0), (30, 1, 30.0), (31, 2, 15.5), (990, 33, 30.0), (1000, 34, 29.412),
    (5000, 64, 78.125),
])
def test_camera_split_offers_the_load_with_cameras_of_at_most_30_fps_up_to_64(
        offered, cameras, fps):
    assert camera_split(offered) == (cameras, fps)
    assert camera_split(offered)[0] * camera_split(offered)[1] == pytest.approx(offered, 1e-3)


def test_camera_split_refuses_no_load():
    with pytest.raises(ValueError, match="must be > 0"):
        camera_split(0)


def test_ladder_merges_fixed_loads_and_fractions_of_flat_out():
    assert ladder_loads(1000, [120, 990], [0.05, 0.5, 0.99]) == [50, 120, 500, 990]
    assert ladder_loads(None, [990, 120], [0.5]) == [120, 990]
    assert ladder_loads(100, [], [0.1], lowest=20) == [20]


def test_cpu_used_counts_new_processes_from_zero_and_drops_gone_ones():
    before = {(1, 1.0): 10.0, (2, 1.0): 5.0, (3, 1.0): 7.0}
    after = {(1, 1.0): 12.5, (2, 1.0): 5.0, (4, 9.0): 1.5, (3, 2.0): 0.25}  # pid 3 reused
    assert cpu_used(before, after) == pytest.approx(2.5 + 0 + 1.5 + 0.25)


def test_frames_per_cpu_second():
    assert frames_per_cpu_second(10_000, 4.0) == 2500.0
    assert frames_per_cpu_second(10_000, 0.0) is None
    assert frames_per_cpu_second(0, 4.0) is None
    assert frames_per_cpu_second(100, None) is None


def test_cpu_snapshot_of_this_process_grows_with_work():
    me = psutil.Process()
    before = cpu_snapshot([me])
    sum(i * i for i in range(2_000_000))
    after = cpu_snapshot([me])
    assert list(after) == [(me.pid, me.create_time())]
    assert cpu_used(before, after) > 0


def test_window_keeps_one_label_per_frame_captured_in_the_step():
    def label(stream: str, index: int, captured: int, labeled: int) -> dict[str, object]:
        return {"stream_id": stream, "frame_index": index, "captured_at_ns": captured,
                "labeled_at_ns": labeled, "status": "ok"}

    labels = [label("cam-0", 0, 100, 200), label("cam-0", 0, 100, 900),  # redelivered
              label("cam-1", 0, 150, 3_000_150), label("cam-0", 0, 50, 60),  # an earlier step
              label("cam-0", 1, 400, 500)]
    mine = window(labels, 100, 300)
    assert [(r["stream_id"], r["labeled_at_ns"]) for r in mine] == [
        ("cam-0", 200), ("cam-1", 3_000_150)]
    assert latency_ms(mine) == [0.0001, 3.0]


def test_peer_program_says_why_a_pipeline_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path / "peers")
    monkeypatch.setattr(peers, "PEER_VENVS", tmp_path / ".venv-peers")
    monkeypatch.setattr(peers, "ROOT", tmp_path)
    argv, why = peers.peer_program("quix")
    assert argv is None and why == "peers/quix_app.py is missing"
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "quix_app.py").write_text("")
    argv, why = peers.peer_program("quix")
    assert argv is None and "make peers" in why and ".venv-peers/quix/bin/python" in why
    (tmp_path / "peers" / "floor.py").write_text("")
    argv, why = peers.peer_program("floor")
    assert argv is not None and argv[1].endswith("peers/floor.py") and why == ""


def results_of_a_run() -> dict[str, object]:
    search = capacity_search(pipeline_with_knee(330, 700), [120, 400, 990], bisections=1)
    steps = sorted(search.steps, key=lambda s: s.offered_fps)
    row = {"name": "floor", "frames_per_s": 5000.0, "frames_per_s_per_core": 2100.5,
           "cpu_s": 2.9, "capacity_fps_p99_15ms": search.capacity[15.0].fps,
           "capacity_fps_p99_15ms_note": "", "capacity_fps_p99_50ms": search.capacity[50.0].fps,
           "capacity_fps_p99_50ms_note": search.capacity[50.0].note,
           "loads": [{"offered_fps": s.offered_fps, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms}
                     for s in steps if s.offered_fps in (120, 990)]}
    return {
        "machine": {"model": "test cpu", "logical_cpus": 2, "loadavg": [1.0, 1.0, 1.0]},
        "date": "2026-12-01 12:00:00 +0000", "command": "framecast bench peers --quick",
        "artifact": "models/fashion_mnist_stream", "counted_cpu": "the broker + ...",
        "options": {"fixed_loads": [120.0, 990.0], "step_seconds": 3.0},
        "pipelines": [row, {"name": "quix", "skipped": "no .venv-peers/quix: run `make peers`"},
                      {"name": "http", "error": "RuntimeError: boom"}],
    }


def test_the_report_names_every_pipeline_and_skips_none_silently(tmp_path: Path):
    results = results_of_a_run()
    text = peers_markdown(results)
    assert "| floor | 5000.0 | 2100.5 | 260.0 | 695.0 | 5.0 / 10.0 | 250.0 / 500.0 |" in text
    assert "| quix | skipped: no .venv-peers/quix: run `make peers` |" in text
    assert "| http | failed: RuntimeError: boom |" in text
    paths = write_peers_outputs(tmp_path, results)
    assert [p.name for p in paths] == ["bench-peers.json", "bench-peers.md", "bench-peers.png"]
    assert json.loads(paths[0].read_text())["pipelines"][0]["capacity_fps_p99_50ms"] == 695.0
    assert paths[2].stat().st_size > 1000
    assert headline({"peers": results}) == {
        "peers: floor capacity fps at p99 <= 15 / 50 ms, frames per CPU-s": "260.0 / 695.0, 2100.5"}


def test_captured_rate_is_the_cameras_real_rate():
    labels = [{"captured_at_ns": t * 10_000_000} for t in range(11)]  # 11 frames 10 ms apart
    assert peers.captured_rate(labels) == 100.0
    assert peers.captured_rate(labels[:1]) is None


def test_chosen_pipelines_keeps_run_order_and_names_unknown_ones() -> None:
    from cluster.bench.peers import PIPELINES, chosen_pipelines
    from cluster.exceptions import SettingsError

    assert chosen_pipelines(None) == PIPELINES
    assert chosen_pipelines("floor, framecast") == ("framecast", "floor")
    with pytest.raises(SettingsError, match="unknown kafka-streams"):
        chosen_pipelines("framecast,kafka-streams")
    with pytest.raises(SettingsError, match="empty list"):
        chosen_pipelines(" , ")


def test_the_camera_regime_has_its_own_ladder_cameras_and_batches() -> None:
    camera = peers.PeersOptions(quick=True, frame_size=(640, 480))
    assert (camera.fps_per_camera, camera.flat_batch, camera.fixed_loads) == (15.0, 16, (120.0,))
    assert peers.camera_split(120.0, camera.fps_per_camera) == (8, 15.0)  # bench pipeline's 8x15
    # ~400 frames/s flat out at 640x480: the ladder is fractions of that, not thousands.
    assert peers.ladder_loads(400.0, camera.fixed_loads, camera.fractions) == [120, 240, 340]
    full = peers.PeersOptions(quick=False, frame_size=(640, 480))
    assert full.fixed_loads == (60.0, 120.0, 240.0) and full.flat_frames > camera.flat_frames
    gray = peers.PeersOptions(quick=True)
    assert (gray.fps_per_camera, gray.flat_batch, gray.fixed_loads) == (30.0, 64, (120.0, 990.0))


def test_ground_truth_accuracy_counts_only_labels_with_ground_truth() -> None:
    labels = [{"class_id": 3, "ground_truth": 3}, {"class_id": 1, "ground_truth": 3},
              {"class_id": 2, "ground_truth": None}, {"status": "dropped", "ground_truth": 1}]
    assert peers.ground_truth_accuracy(labels) == {"ground_truth_labels": 2,
                                                   "flat_out_accuracy": 0.5}
    assert peers.ground_truth_accuracy([]) == {"ground_truth_labels": 0,
                                               "flat_out_accuracy": None}


def test_the_report_says_its_regime() -> None:
    results = results_of_a_run()
    assert peers_markdown(results).startswith("# framecast bench peers: 28x28 frames\n")
    results |= {"frame_size": "640x480", "frames": "640x480 RGB JPEG camera frames (...)"}
    text = peers_markdown(results)
    assert text.startswith("# framecast bench peers: 640x480 camera JPEG frames\n")
    assert "Frames: 640x480 RGB JPEG camera frames (...)." in text
