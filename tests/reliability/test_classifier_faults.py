"""Classifier faults: a process SIGKILLed before it commits, members joining and leaving.

Numbered frames go in; the labels topic is compared with them. At-least-once may repeat
a frame that was labelled but not yet committed, never lose one; exactly-once (labels read
with read_committed) has exactly one label per frame.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cluster.ray_head import RayHeadInfo
from streams.config import KafkaSettings
from tests.reliability.conftest import Record
from tests.streaming import (
    BackgroundClassifier,
    Feeder,
    LabelProbe,
    classifier,
    labels_of,
    read_topic,
    stop_when_labelled,
    stream_run_argv,
    stream_run_env,
    tally,
    topics,
    wait_for_start,
)

pytestmark = pytest.mark.timeout(420)

GUARANTEES = ["at-least-once", "exactly-once"]


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_classifier_sigkilled_before_commit_resumes_from_committed_offsets(
    kafka_settings: KafkaSettings,
    reliability_app: str,
    ray_head: RayHeadInfo,
    tmp_path: Path,
    figures: Record,
    guarantee: str,
) -> None:
    config = topics(kafka_settings, partitions=2).model_copy(update={"guarantee": guarantee})
    argv = stream_run_argv(
        kafka_settings,
        config,
        reliability_app,
        ray_head,
        tmp_path,
        "--consumer-id",
        "killed-then-restarted",  # exactly-once: the restart fences the zombie
        "--max-batch",
        "16",
    )
    probe = LabelProbe(kafka_settings, config.labels_topic)
    feeder = Feeder(kafka_settings, config.frames_topic, streams=2, per_stream=250, fps=25.0)
    log = tmp_path / "first.log"
    try:
        with log.open("wb") as handle:
            first = subprocess.Popen(
                argv, env=stream_run_env(), stdout=handle, stderr=subprocess.STDOUT
            )
            try:
                # Frames start once it consumes (its start-up takes seconds on a busy
                # machine), so that the kill lands mid-stream, with frames still to come.
                wait_for_start(first, log)
                feeder.start()
                seen = probe.wait_for(150)
            finally:
                first.send_signal(signal.SIGKILL)  # no drain, no commit, no abort
                first.wait(30)
        assert 150 <= seen < 500, log.read_text()[-3000:]
        expected = feeder.finish()
    finally:
        feeder.stop_event.set()
        probe.close()
    second = subprocess.run(
        argv, env=stream_run_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert second.returncode == 0, second.stderr[-3000:]
    resumed: dict[str, Any] = json.loads(second.stdout.strip().splitlines()[-1])
    exactly_once = guarantee == "exactly-once"
    labels = labels_of(
        read_topic(kafka_settings, config.labels_topic, len(expected), committed_only=exactly_once)
    )
    counts = tally(expected, labels)
    figures(
        guarantee=guarantee,
        **counts,
        labelled_before_kill=seen,
        labelled_after_restart=resumed["labelled"],
    )
    assert counts["losses"] == 0 and counts["unexpected"] == 0, counts
    assert 0 < resumed["labelled"] < len(expected), "did not resume from the committed offsets"
    if exactly_once:
        assert counts["duplicates"] == 0, counts
    else:
        # Only what the killed process labelled after its last commit is labelled again.
        assert counts["duplicates"] <= len(expected) - resumed["labelled"], counts


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_member_joins_then_one_leaves_mid_stream(
    kafka_settings: KafkaSettings, reliability_app: str, figures: Record, guarantee: str
) -> None:
    config = topics(kafka_settings, partitions=4).model_copy(
        update={"guarantee": guarantee, "max_batch_frames": 16, "idle_exit_s": None}
    )
    probe = LabelProbe(kafka_settings, config.labels_topic)
    feeder = Feeder(kafka_settings, config.frames_topic, streams=4, per_stream=200, fps=20.0)

    def member(name: str) -> BackgroundClassifier:
        return BackgroundClassifier(
            classifier(
                kafka_settings,
                config.model_copy(update={"consumer_id": f"member-{name}"}),
                reliability_app,
            )
        )

    first = member("a")
    first.start()
    feeder.start()
    try:
        assert probe.wait_for(120) >= 120
        second = member("b")
        second.start()  # joins: the group rebalances, partitions move from a to b
        assert probe.wait_for(probe.seen + 200) >= 320
        first.member.stop()  # leaves: drains, commits, closes; b takes every partition
        first_totals = first.finish()
        expected = feeder.finish()
        second_totals = stop_when_labelled(second, probe, expected)
    finally:
        feeder.stop_event.set()
        first.abandon()
        if "second" in locals():
            second.abandon()
        probe.close()
    exactly_once = guarantee == "exactly-once"
    labels = labels_of(
        read_topic(kafka_settings, config.labels_topic, len(expected), committed_only=exactly_once)
    )
    counts = tally(expected, labels)
    figures(
        guarantee=guarantee,
        **counts,
        labelled_by_a=first_totals["labelled"],
        labelled_by_b=second_totals["labelled"],
    )
    assert counts["losses"] == 0 and counts["unexpected"] == 0, counts
    # (b may label nothing when a, on a busy machine, finished the stream before b had joined.)
    assert first_totals["labelled"] > 0
    if exactly_once:
        assert counts["duplicates"] == 0, counts
    else:
        # Every label sent is counted by the member that sent it ...
        assert counts["labels_received"] == first_totals["labelled"] + second_totals["labelled"]
        # ... and only work in hand at a hand-over (in-flight batches plus what was labelled
        # since the last commit) can be redone: a small fraction of the stream.
        assert counts["duplicates"] <= len(expected) // 4, counts
