"""`framecast dashboard` in a real browser (Debian's chromium, headless, driven by Playwright)
beside a real stream: the session broker, Ray Serve with the shipped model, and the stream
classifier, with 64 cameras. The page must load without a console error, show a tile for each
camera, count up, show on each tile the label its camera last got in the labels topic, and list
a dead letter once a bad frame was sent.

Artifacts under the test's tmp dir: dashboard.png (the page at the end) and dashboard-cpu.json
(the dashboard process's CPU while it ran).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from cluster.processes import free_port, wait_until
from streams.config import KafkaSettings
from tests.streaming import (
    BackgroundClassifier,
    Feeder,
    LabelProbe,
    RawProducer,
    classifier,
    read_topic,
    topics,
)

CHROMIUM = Path("/usr/bin/chromium")
CAMERAS = 64
FPS = float(os.environ.get("FRAMECAST_DASHBOARD_TEST_FPS", "2"))  # per camera, for 20 s
PAGE = 16  # tiles a page of the dashboard shows (static/app.js PAGE_SIZE)
TOKEN = "dashboard-test-token-0123456789"
ARTIFACT_DOC = os.environ.get("FRAMECAST_DASHBOARD_SCREENSHOT")  # also copy the PNG here

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extras) missing")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (make setup)"),
]


class DashboardProcess:
    """`framecast dashboard` as a user runs it, in a process of its own."""

    def __init__(self, kafka_settings: KafkaSettings, config: Any, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "dashboard.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMECAST_")}
        env["FRAMECAST_DASHBOARD_TOKEN"] = TOKEN
        argv = [
            str(Path(sys.executable).parent / "framecast"), "--home", str(home),
            "--bootstrap-servers", str(kafka_settings.bootstrap_servers),
            "dashboard", "--port", str(self.port), "--group", f"{config.group}-dashboard",
            "--frames", config.frames_topic, "--labels", config.labels_topic,
            "--latency", config.latency_topic, "--dlq", config.dlq_topic,
            "--classifier-group", config.group,
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        assert wait_until(self._up, timeout=120), f"the dashboard did not start: {self.tail()}"

    def _up(self) -> bool:
        assert self.process.poll() is None, f"the dashboard exited: {self.tail()}"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def snapshot(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/api/snapshot", timeout=10,
                           headers={"Authorization": f"Bearer {TOKEN}"})
        answer.raise_for_status()
        return dict(answer.json())

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return -9


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def last_labels(kafka_settings: KafkaSettings, topic: str, expected: int) -> dict[str, Any]:
    """Each camera's last label in the topic (a camera's labels share a partition: its key)."""
    last: dict[str, Any] = {}
    for record in sorted(read_topic(kafka_settings, topic, expected, settle_s=1.0),
                         key=lambda r: (r.partition, r.offset)):
        label = json.loads(record.value)
        last[label["stream_id"]] = (label["label"], label["frame_index"])
    return last


def tiles_of_every_page(page: Any) -> dict[str, Any]:
    """{stream_id: (label, frame_index)} of every tile, page after page."""
    shown: dict[str, Any] = {}
    pages = int(page.inner_text("#page").split("/")[1])
    for _ in range(pages):
        page.click("#prev")
    for _ in range(pages):
        for tile in page.eval_on_selector_all(
            ".tile", "els => els.map(e => [e.dataset.streamId, "
            "e.querySelector('.label').dataset.label, "
            "e.querySelector('.label').dataset.frameIndex])"
        ):
            shown[tile[0]] = (tile[1], int(tile[2]) if tile[2] else None)
        page.click("#next")
    return shown


def test_the_page_follows_a_live_stream_of_64_cameras(
    kafka_settings: KafkaSettings, stream_app: str, tmp_path: Path, browser: Any
) -> None:
    config = topics(kafka_settings).model_copy(update={"idle_exit_s": None})
    dashboard = DashboardProcess(kafka_settings, config, tmp_path)
    member = BackgroundClassifier(classifier(kafka_settings, config, stream_app))
    feeder = Feeder(kafka_settings, config.frames_topic, streams=CAMERAS,
                    per_stream=int(20 * FPS), fps=FPS)
    probe = LabelProbe(kafka_settings, config.labels_topic)
    errors: list[str] = []
    try:
        # Without the token the page is refused; with it once in the URL, it is a cookie.
        refused = browser.new_page()
        assert refused.goto(f"{dashboard.url}/").status == 401
        refused.close()
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        assert page.goto(f"{dashboard.url}/?token={TOKEN}").status == 200
        assert "token" not in page.url

        member.start()
        feeder.start()
        cpu_at, wall_at = dashboard.cpu_seconds(), time.monotonic()

        # a tile for each camera: the first page is full and the pager counts them all
        page.wait_for_function(
            "n => document.getElementById('camera-count').textContent.startsWith(n + ' of')",
            arg=CAMERAS, timeout=180_000,
        )
        assert page.locator(".tile").count() == PAGE
        # the counts rise
        first = int(page.inner_text("#k-labelled").replace(",", ""))
        page.wait_for_function(
            "n => Number(document.getElementById('k-labelled').textContent.replace(/,/g, '')) > n",
            arg=first, timeout=60_000,
        )
        # a bad frame -> a dead letter, listed with its source offset
        bad_offset = RawProducer(kafka_settings, config.frames_topic).send(
            b"not an arrow stream",
            [("content-type", b"application/vnd.apache.arrow.stream")], key=b"cam-0",
        )
        page.wait_for_function(
            "o => [...document.querySelectorAll('#dlq tr.dead-letter')].some(r => "
            "r.cells[1].textContent === 'bad_arrow' && r.cells[2].textContent.includes('@' + o))",
            arg=bad_offset, timeout=120_000,
        )

        sent = feeder.finish()
        assert probe.wait_for_frames(sent, timeout_s=300), "not every frame was labelled"
        cpu_seconds = dashboard.cpu_seconds() - cpu_at
        wall_seconds = time.monotonic() - wall_at

        # each tile shows its camera's last label in the labels topic
        expected = last_labels(kafka_settings, config.labels_topic, len(sent))
        assert len(expected) == CAMERAS
        page.wait_for_function(
            "n => Number(document.getElementById('k-labelled').textContent.replace(/,/g, ''))"
            " >= n", arg=len(sent), timeout=60_000,
        )
        shown: dict[str, Any] = {}
        for _ in range(20):  # the page may be one update behind the topic's end
            shown = tiles_of_every_page(page)
            if shown == expected:
                break
            page.wait_for_timeout(500)
        assert shown == expected

        snapshot = dashboard.snapshot()
        assert snapshot["totals"]["cameras"] == CAMERAS
        assert snapshot["totals"]["labelled"] >= len(sent)
        assert snapshot["model"]["name"]
        assert snapshot["dlq"]["total"] >= 1
        assert any(p["committed"] is not None for p in snapshot["lag"]["partitions"])
        assert any(c["picture"] for c in snapshot["cameras"])
        seq = int(page.evaluate("document.body.dataset.seq"))
        page.wait_for_function("s => Number(document.body.dataset.seq) > s + 1", arg=seq)

        for _ in range(int(page.inner_text("#page").split("/")[1])):
            page.click("#prev")  # the first page, for the screenshot
        page.wait_for_timeout(1000)  # the last pictures drawn
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        if ARTIFACT_DOC:
            shutil.copyfile(tmp_path / "dashboard.png", ARTIFACT_DOC)
        cpu = {
            "cameras": CAMERAS, "frames": len(sent), "seconds": round(wall_seconds, 1),
            "frames_per_s": round(len(sent) / wall_seconds, 1),
            "cpu_percent_of_one_core": round(100 * cpu_seconds / wall_seconds, 2),
            "update_ms": snapshot["update_ms"],
        }
        (tmp_path / "dashboard-cpu.json").write_text(json.dumps(cpu, indent=2))
        print(f"dashboard: {cpu}; screenshot {tmp_path / 'dashboard.png'}")
        assert errors == []
    finally:
        feeder.stop_event.set()
        member.abandon()
        probe.close()
        code = dashboard.stop()
    assert code == 0, dashboard.tail()
