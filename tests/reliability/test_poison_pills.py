"""No message stops the stream (issue 17): poison pills, amplification, hostile headers,
records the brokers refuse, wrong clocks and a replica that fails on one frame.

Each bad input is sent from a plain producer between numbered good frames, against the real
broker and real Ray. Checked for each: the good frame after it is labelled; one DLQ record
at its offset (and row) with its stable reason; the classifier process is still the same
one; the group's committed offset moves past it; the classifier's memory stays bounded.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from kafka import KafkaProducer
from PIL import Image

from cluster.processes import wait_until
from serving.frames import ARROW_CONTENT_TYPE, encode_frames
from streams.classifier import ClassifierConfig
from streams.config import KafkaSettings
from streams.latency import LatencyRecord
from tests.kafka_python import kafka_python_config
from tests.reliability.conftest import Record, peak_rss_mb
from tests.reliability.test_bad_input import arrow_bomb
from tests.serve_poison import POISON_STREAM, deploy_poison_app
from tests.streaming import (
    IMAGES,
    BackgroundClassifier,
    DeadLetter,
    LabelProbe,
    RawHeaderKey,
    RawProducer,
    arrow_message,
    classifier,
    committed_offsets,
    dead_letters,
    frame,
    frame_row,
    labels_of,
    read_topic,
    run_classifier,
    set_max_message_bytes,
    stream_run_argv,
    stream_run_env,
    tally,
    topics,
    wait_for_start,
)

pytestmark = pytest.mark.timeout(300)

ARROW = [("content-type", ARROW_CONTENT_TYPE.encode())]
# The classifier's peak RSS may grow by at most this much over a run of every poison pill,
# amplification included (docs/reliability.md: the 512 MiB ZSTD bomb alone would be 512).
RSS_GROWTH_BOUND_MB = 160
BOMB_BYTES = 512 * 2**20


def _bare(value: bytes, content_type: bytes = b"image/png", **headers: bytes) -> dict[str, Any]:
    named = {"stream_id": b"cam-bad", "frame_index": b"0", "captured_at_ns": b"1", **headers}
    return {"value": value, "headers": [("content-type", content_type), *named.items()]}


def _png(stream: int, index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(IMAGES[(index * 7 + stream) % len(IMAGES)]).save(buffer, format="PNG")
    return buffer.getvalue()


# name -> (message, {row: reason}); rows left out of the dict are good frames.
def _poison_pills() -> dict[str, tuple[dict[str, Any], dict[int, str]]]:
    bad_id = b"cam-\xff\xfe"
    arrow = ARROW
    return {
        # Class 1: Arrow values the schema lets through.
        "stream_id not UTF-8 (the issue's measured case)": (
            {"value": arrow_message([frame_row(0, 0, stream_id=bad_id)]), "headers": arrow},
            {0: "bad_value"},
        ),
        "null frame_index": (
            {"value": arrow_message([frame_row(0, 0, frame_index=None)]), "headers": arrow},
            {0: "bad_value"},
        ),
        "null data and encoding": (
            {"value": arrow_message([frame_row(0, 0, data=None, encoding=None)]),
             "headers": arrow},
            {0: "bad_value"},
        ),
        "partly good message (rows 1 and 3 bad)": (
            {
                "value": arrow_message(
                    [
                        frame_row("cam-part", 0),
                        frame_row("cam-part", 1, captured_at_ns=None),
                        frame_row("cam-part", 2),
                        frame_row(bad_id, 3),
                    ]
                ),
                "headers": arrow,
            },
            {1: "bad_value", 3: "bad_value"},
        ),
        "10 kB stream id (Arrow)": (
            {"value": arrow_message([frame_row("x" * 10_000, 0)]), "headers": arrow},
            {0: "stream_id_too_long"},
        ),
        # Class 2: bare-image headers.
        "frame_index over int64": (
            _bare(_png(0, 0), frame_index=b"99999999999999999999"), {0: "bad_headers"}
        ),
        "captured_at_ns not a number": (
            _bare(_png(0, 0), captured_at_ns=b"soon"), {0: "bad_headers"}
        ),
        "stream_id header not UTF-8": (_bare(_png(0, 0), stream_id=bad_id), {0: "bad_headers"}),
        "10 kB stream id (header)": (
            _bare(_png(0, 0), stream_id=b"y" * 10_000), {0: "stream_id_too_long"}
        ),
        "odd-case content types with parameters (good frames)": (
            _bare(_png(7, 0), b"Image/PNG; charset=binary", stream_id=b"cam-7",
                  captured_at_ns=str(time.time_ns()).encode()),
            {},
        ),
        "odd-case Arrow content type with parameters (a good frame)": (
            {
                "value": arrow_message([frame_row(7, 1)]),
                "headers": [("Content-Type", b"Application/Vnd.Apache.Arrow.Stream; v=1")],
            },
            {},
        ),
        # Class 3: amplification.
        "5000 rows (over max_message_frames)": (
            {
                "value": arrow_message(
                    [frame_row("cam-many", i, height=1, width=1, data=b"\x00")
                     for i in range(5000)]
                ),
                "headers": arrow,
            },
            {0: "too_many_frames"},
        ),
        "ZSTD Arrow bomb (512 MiB from a few kB)": (
            {"value": arrow_bomb(BOMB_BYTES), "headers": arrow},
            {0: "too_large"},
        ),
        "32 rows of 4 MiB each, ZSTD (128 MiB)": (
            {
                "value": arrow_message(
                    [frame_row("cam-big", i, data=bytes(4 * 2**20)) for i in range(32)],
                    compression="zstd",
                ),
                "headers": arrow,
            },
            {0: "too_large"},
        ),
    }


GOOD_IN_PILLS = {("cam-part", 0), ("cam-part", 2), ("cam-7", 0), ("cam-7", 1)}


def _send_pills(kafka_settings: KafkaSettings, topic: str) -> tuple[
    set[tuple[str, int]], dict[tuple[int, int], str], dict[str, int]
]:
    """Good frame 0, a pill, good frame 1, ... and last a message whose header key is not
    UTF-8 (from kafka-python: see RawHeaderKey), then a good frame. Returns the good frames,
    (offset, row) -> reason of every dead letter expected, and each pill's offset."""
    raw = RawProducer(kafka_settings, topic)
    good: set[tuple[str, int]] = set(GOOD_IN_PILLS)
    expected: dict[tuple[int, int], str] = {}
    where: dict[str, int] = {}
    index = 0
    for name, (message, rows) in _poison_pills().items():
        raw.good(0, index)
        good.add(("cam-0", index))
        index += 1
        offset = raw.send(key=b"cam-bad", **message)
        where[name] = offset
        expected.update({(offset, row): reason for row, reason in rows.items()})
    raw.good(0, index)
    good.add(("cam-0", index))
    index += 1
    kp = KafkaProducer(**kafka_python_config(kafka_settings), acks="all")
    header_key = RawHeaderKey(b"stream_id\xff")
    bad_key = kp.send(
        topic, key=b"cam-bad", value=_png(0, 0),
        headers=[("content-type", b"image/png"), (header_key, b"cam-bad")],
    ).get(timeout=60)
    kp.close()
    where["header key not UTF-8"] = bad_key.offset
    expected[(bad_key.offset, 0)] = "bad_headers"
    raw.good(0, index)
    good.add(("cam-0", index))
    return good, expected, where


def _check_dead_letters(
    letters: list[DeadLetter], expected: dict[tuple[int, int], str]
) -> dict[tuple[int, int], str]:
    got = {(d.offset, d.row): d.reason for d in letters}
    assert len(letters) == len(got), "a dead letter was written twice"
    assert got == expected
    for d in letters:
        assert d.headers["error.class"] and d.headers["error.detail"]
    return got


def test_poison_pills_between_good_frames_never_stop_stream_run(
    kafka_settings: KafkaSettings,
    reliability_app: str,
    ray_head: Any,
    tmp_path: Path,
    figures: Record,
) -> None:
    """`framecast stream run` as its own process: every pill of classes 1-3 is sent while it
    runs; it labels every good frame, dead-letters every pill, commits past them all, keeps
    its PID and its memory. Before issue 17 the first pill made it exit (UnicodeDecodeError,
    none of the 124 good frames around it labelled, no offset committed)."""
    config = topics(
        kafka_settings, partitions=1, topic_config={"max.message.bytes": str(8 * 2**20)}
    )
    argv = stream_run_argv(
        kafka_settings, config, reliability_app, ray_head, tmp_path, "--max-batch", "64",
        idle_exit_s=120,
    )
    log = tmp_path / "stream-run.log"
    out = tmp_path / "stream-run.out"
    probe = LabelProbe(kafka_settings, config.labels_topic)
    with log.open("wb") as err, out.open("wb") as stdout:
        process = subprocess.Popen(argv, env=stream_run_env(), stdout=stdout, stderr=err)
        try:
            wait_for_start(process, log)
            # Warm up (the first frame pays for imports and the handle), then the baseline.
            RawProducer(kafka_settings, config.frames_topic).good(1, 0)
            assert probe.wait_for_frames({("cam-1", 0)}, 120), log.read_text()[-3000:]
            before_mb = peak_rss_mb(process.pid)
            good, expected, where = _send_pills(kafka_settings, config.frames_topic)
            labelled = probe.wait_for_frames(good, 180)
            assert process.poll() is None, log.read_text()[-3000:]  # the same process
            total = max(where.values()) + 2  # the last good frame follows the last pill
            assert wait_until(
                lambda: committed_offsets(kafka_settings, config.group) >= total, timeout=60
            ), f"committed {committed_offsets(kafka_settings, config.group)} of {total}"
            growth_mb = peak_rss_mb(process.pid) - before_mb
            assert process.poll() is None
        finally:
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(120)
    probe.close()
    assert labelled, f"missing labels: {good - probe.keys}"
    assert returncode == 0, log.read_text()[-3000:]
    totals = json.loads(out.read_text().strip().splitlines()[-1])
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, len(good) + 1))
    counts = tally(good | {("cam-1", 0)}, labels)
    reasons = _check_dead_letters(
        dead_letters(kafka_settings, config.dlq_topic, len(expected)), expected
    )
    # The partly good message: its good rows labelled with their row index.
    part = [lab for lab in labels if lab.stream_id == "cam-part"]
    assert sorted(lab.source.row for lab in part) == [0, 2]
    figures(
        **counts,
        bad_messages=len(where),
        dlq_records=len(reasons),
        dlq_reasons=sorted(set(reasons.values())),
        classifier_totals={k: totals[k] for k in ("labelled", "dlq")},
        classifier_peak_rss_before_mb=round(before_mb, 1),
        classifier_peak_rss_growth_mb=round(growth_mb, 1),
    )
    assert counts["losses"] == 0 and counts["duplicates"] == 0 and counts["unexpected"] == 0
    assert growth_mb < RSS_GROWTH_BOUND_MB, growth_mb


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_label_the_topic_can_never_take_sends_the_frame_to_the_dlq(
    kafka_settings: KafkaSettings, reliability_app: str, guarantee: str, figures: Record
) -> None:
    """A labels topic whose max.message.bytes (200) is below any label (~460 bytes): each
    refusal is learned, the frame goes to the DLQ as ``label_refused``, its offset is
    committed, and the classifier does not re-read it forever (it reaches its idle exit)."""
    config = topics(kafka_settings, partitions=1).model_copy(update={"guarantee": guarantee})
    set_max_message_bytes(kafka_settings, config.labels_topic, 200)
    raw = RawProducer(kafka_settings, config.frames_topic)
    offsets = [raw.good(0, i) for i in range(10)]
    started = time.monotonic()
    totals = run_classifier(kafka_settings, config, reliability_app)
    seconds = time.monotonic() - started
    committed_only = guarantee == "exactly-once"
    letters = dead_letters(kafka_settings, config.dlq_topic, 10, committed_only)
    _check_dead_letters(letters, {(o, 0): "label_refused" for o in offsets})
    assert read_topic(kafka_settings, config.labels_topic, 0, settle_s=1) == []
    assert committed_offsets(kafka_settings, config.group) == 10
    figures(frames_sent=10, dlq_label_refused=len(letters), dlq_duplicates=0,
            classifier_dlq=totals["dlq"], run_s=round(seconds, 1))


def test_exactly_once_poison_pills_give_no_duplicates_under_read_committed(
    kafka_settings: KafkaSettings, reliability_app: str, figures: Record
) -> None:
    config = topics(kafka_settings, partitions=1).model_copy(
        update={"guarantee": "exactly-once"}
    )
    pills = _poison_pills()
    chosen = [
        "stream_id not UTF-8 (the issue's measured case)",
        "partly good message (rows 1 and 3 bad)",
        "frame_index over int64",
        "5000 rows (over max_message_frames)",
    ]
    raw = RawProducer(kafka_settings, config.frames_topic)
    good = {("cam-part", 0), ("cam-part", 2)}
    expected: dict[tuple[int, int], str] = {}
    for i, name in enumerate(chosen):
        raw.good(0, i)
        good.add(("cam-0", i))
        message, rows = pills[name]
        offset = raw.send(key=b"cam-bad", **message)
        expected.update({(offset, row): reason for row, reason in rows.items()})
    raw.good(0, len(chosen))
    good.add(("cam-0", len(chosen)))
    run_classifier(kafka_settings, config, reliability_app)
    labels = labels_of(
        read_topic(kafka_settings, config.labels_topic, len(good), committed_only=True)
    )
    counts = tally(good, labels)
    letters = dead_letters(kafka_settings, config.dlq_topic, len(expected), committed_only=True)
    _check_dead_letters(letters, expected)
    figures(**counts, dlq_records=len(letters))
    assert counts["losses"] == 0 and counts["duplicates"] == 0 and counts["unexpected"] == 0
    assert committed_offsets(kafka_settings, config.group) == 2 * len(chosen) + 1


def _recreate(kafka_settings: KafkaSettings, topic: str, delete: bool) -> None:
    admin = AdminClient(kafka_settings.rdkafka_config())
    deadline = time.monotonic() + 60
    while True:
        futures = (
            admin.delete_topics([topic]) if delete else admin.create_topics([NewTopic(topic, 1, 1)])
        )
        try:
            futures[topic].result(30)
            return
        except Exception:  # still being deleted: try again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(420)
def test_a_labels_topic_deleted_mid_stream_holds_the_commits_and_loses_no_frame(
    kafka_settings: KafkaSettings, reliability_app: str, figures: Record
) -> None:
    """The labels topic disappears (auto-creation is off), then comes back: while it is
    away nothing is committed past the frames whose labels went nowhere; once it is back
    labelling resumes, and every frame sent meanwhile is labelled in the new topic."""
    config = topics(kafka_settings, partitions=1).model_copy(update={"idle_exit_s": None})
    member = classifier(kafka_settings, config, reliability_app)
    runner = BackgroundClassifier(member)
    runner.start()
    raw = RawProducer(kafka_settings, config.frames_topic)
    probe = LabelProbe(kafka_settings, config.labels_topic)
    try:
        for i in range(20):
            raw.good(0, i)
        assert probe.wait_for_frames({("cam-0", i) for i in range(20)}, 120)
        assert wait_until(lambda: committed_offsets(kafka_settings, config.group) == 20, 60)
        probe.close()
        _recreate(kafka_settings, config.labels_topic, delete=True)
        for i in range(20, 40):
            raw.good(0, i)
        held = []
        for _ in range(8):  # the topic stays away for ~8 s
            time.sleep(1)
            held.append(committed_offsets(kafka_settings, config.group))
        _recreate(kafka_settings, config.labels_topic, delete=False)
        probe = LabelProbe(kafka_settings, config.labels_topic)
        later = {("cam-0", i) for i in range(20, 40)}
        resumed = probe.wait_for_frames(later, 180)
        assert wait_until(lambda: committed_offsets(kafka_settings, config.group) == 40, 120)
    finally:
        member.stop()
        runner.abandon()
        probe.close()
    totals = runner.finish()
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 20))
    counts = tally(later, labels)
    figures(
        frames_before=20,
        frames_while_away=20,
        committed_while_away=sorted(set(held)),
        labels_in_new_topic=len(labels),
        losses=counts["losses"],
        classifier_labelled=totals["labelled"],
        classifier_dlq=totals["dlq"],
    )
    assert held and max(held) == 20, held  # never past the unlabelled frames
    assert resumed and counts["losses"] == 0
    assert totals["dlq"] == 0


def test_camera_clocks_far_off_neither_give_negative_latency_nor_dodge_the_deadline(
    kafka_settings: KafkaSettings, reliability_app: str, figures: Record
) -> None:
    """captured_at_ns an hour ahead or 20 years behind Kafka's timestamp: labelled, with
    timings_ms.clock_skew and latency measured from Kafka's timestamp; a frame an hour
    ahead in a message Kafka stamped 10 minutes ago is still dropped for its deadline; the
    latency aggregates stay in milliseconds."""
    config = topics(kafka_settings, partitions=1).model_copy(update={"deadline_ms": 60_000})
    raw = RawProducer(kafka_settings, config.frames_topic)
    now = time.time_ns()
    hour, years = 3600 * 10**9, 20 * 365 * 86400 * 10**9
    raw.good(0, 0)
    raw.good(0, 1, captured_at_ns=now + hour)
    raw.good(0, 2, captured_at_ns=now - years)
    # An hour ahead, in a message Kafka stamped 10 minutes ago: too late for the deadline.
    late = encode_frames([frame(0, 3, captured_at_ns=now + hour)])
    raw.send(late, ARROW, b"cam-0", timestamp_ms=now // 10**6 - 600_000)
    raw.good(0, 4)
    totals = run_classifier(kafka_settings, config, reliability_app)
    labels = {lab.frame_index: lab for lab in labels_of(
        read_topic(kafka_settings, config.labels_topic, 5))}
    assert sorted(labels) == [0, 1, 2, 3, 4]
    assert labels[3].status == "dropped_deadline"
    for i in (0, 1, 2, 4):
        lab = labels[i]
        assert lab.status == "ok", i
        assert 0 <= lab.timings_ms["end_to_end"] < 60_000, lab.timings_ms
    for i in (1, 2, 3):
        assert "clock_skew" in labels[i].timings_ms, labels[i].timings_ms
    assert labels[1].timings_ms["clock_skew"] > 3_000_000  # an hour ahead, in ms
    assert "clock_skew" not in labels[0].timings_ms
    aggregates = [
        LatencyRecord.model_validate_json(r.value)
        for r in read_topic(kafka_settings, config.latency_topic, 1)
    ]
    worst = max(a.max_ms or 0 for a in aggregates)
    p99 = max(a.p99_ms or 0 for a in aggregates)
    figures(
        labelled=totals["labelled"],
        dropped_deadline=totals["dropped_deadline"],
        clock_skew_ms={i: labels[i].timings_ms["clock_skew"] for i in (1, 2, 3)},
        end_to_end_ms={i: labels[i].timings_ms["end_to_end"] for i in (0, 1, 2, 4)},
        aggregate_p99_ms=p99,
        aggregate_max_ms=worst,
    )
    assert totals["dropped_deadline"] == 1
    assert worst < 60_000 and p99 < 60_000  # not an hour, not 20 years


@pytest.fixture(scope="module")
def poison_app(serve_port: int) -> Any:
    """The test double of tests/serve_poison.py as Serve app ``poison``."""
    from ray import serve

    handle = deploy_poison_app("poison")
    yield handle
    serve.delete("poison")


def test_a_frame_a_replica_always_fails_on_goes_to_the_dlq_and_its_batch_is_labelled(
    kafka_settings: KafkaSettings, poison_app: Any, figures: Record
) -> None:
    """A replica that raises on any call holding one particular frame: the classifier
    retries serve_max_attempts times, splits the batch to isolate the frame, labels the
    others and dead-letters that one as ``replica_error`` - a bounded number of calls."""
    attempts, batch = 2, 8
    config = topics(kafka_settings, partitions=1).model_copy(
        update={"serve_max_attempts": attempts, "max_batch_frames": batch}
    )
    raw = RawProducer(kafka_settings, config.frames_topic)
    offsets = {}
    for i in range(24):
        if i == 10:
            message = arrow_message([frame_row(POISON_STREAM, i)])
            offsets["poison"] = raw.send(message, ARROW, POISON_STREAM.encode())
        else:
            raw.good(0, i)
    before = poison_app.counts.remote().result(timeout_s=30)
    totals = run_classifier(kafka_settings, config, "poison")
    after = poison_app.counts.remote().result(timeout_s=30)
    calls = {k: after[k] - before[k] for k in after}
    labels = labels_of(read_topic(kafka_settings, config.labels_topic, 23))
    good = {("cam-0", i) for i in range(24) if i != 10}
    counts = tally(good, labels)
    letters = dead_letters(kafka_settings, config.dlq_topic, 1)
    _check_dead_letters(letters, {(offsets["poison"], 0): "replica_error"})
    assert b"RuntimeError" in letters[0].headers["error.detail"]
    # Each halving of the batch costs the poisoned half `attempts` calls: 8, 4, 2, 1 frames.
    levels = int(np.log2(batch)) + 1
    figures(**counts, serve_calls=calls["calls"], poisoned_calls=calls["poisoned_calls"],
            bound=attempts * levels, dlq=totals["dlq"])
    assert counts["losses"] == 0 and counts["duplicates"] == 0 and counts["unexpected"] == 0
    assert attempts <= calls["poisoned_calls"] <= attempts * levels
    assert totals["dlq"] == 1 and totals["labelled"] == 23
    assert committed_offsets(kafka_settings, config.group) == 24


def test_stream_run_without_the_serve_app_fails_with_one_clear_line(
    kafka_settings: KafkaSettings, serve_port: int, ray_head: Any, tmp_path: Path
) -> None:
    config: ClassifierConfig = topics(kafka_settings, partitions=1)
    argv = stream_run_argv(kafka_settings, config, "no-such-app", ray_head, tmp_path)
    result = subprocess.run(
        argv, env=stream_run_env(), capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "no-such-app" in line]
    assert len(lines) == 1, result.stderr[-3000:]
