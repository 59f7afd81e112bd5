"""Real sources into the session broker: H.264/H.265 files and a real RTSP server.

The RTSP server is GStreamer's gst-rtsp-server (tests/rtsp_server.py, run with Debian's
python3; `make setup` installs it as root), serving H.264 clips these tests make with PyAV:
320x240 at 15 fps where frame i shows a white bar at x = 4 + 5 i, so every frame that reaches
the topic says which frame of the clip it was.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from cluster.processes import free_port
from serving.preprocess import DecodeLimits, decode_frame
from streams.config import KafkaSettings, TopicSettings
from streams.exceptions import SourceError
from streams.frames import FrameRecord
from streams.producers import ProducerError, produce_frames
from streams.rtsp import PASSWORD_ENV, USER_ENV, RtspSource
from tests.conftest import REPO, run_cli
from tests.integration.test_producers import frames_by_stream, read_topic

SYSTEM_PYTHON = "/usr/bin/python3"
LAUNCHER = REPO / "tests" / "rtsp_server.py"
LIMITS = DecodeLimits(max_bytes=1 << 22, max_pixels=4000 * 4000, max_side=4000)
WIDTH, HEIGHT, RATE = 320, 240, 15
PASSWORD = "s3cret-Pw"  # the camera's password in these tests: it must never be shown


def _gst_rtsp_missing() -> str | None:
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run(
        [SYSTEM_PYTHON, str(LAUNCHER), "--check"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"GStreamer's RTSP server is not installed ({said}; as root: make setup, or "
            "apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-good "
            "gstreamer1.0-plugins-bad)"
        )
    return None


_RTSP_MISSING = _gst_rtsp_missing()
needs_rtsp = pytest.mark.skipif(_RTSP_MISSING is not None, reason=str(_RTSP_MISSING))


def write_clip(path: Path, frames: int, codec: str = "libx264") -> Path:
    """320x240 at 15 fps; frame i: a white bar at x = 4 + 5 i on gray (i < 63)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(RATE), "x265-params": "log-level=error"}
        for i in range(frames):
            pixels = np.full((HEIGHT, WIDTH, 3), 40, dtype=np.uint8)
            pixels[:, 4 + 5 * i : 8 + 5 * i] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def clip_index(pixels: np.ndarray) -> int:
    """Which frame of the clip these pixels show (at any scale)."""
    columns = pixels[..., 0].astype(np.float64).mean(axis=0)
    bright = np.flatnonzero(columns > (columns.max() + columns.min()) / 2)
    centre = bright.mean() * WIDTH / pixels.shape[1]
    return round((centre - 6) / 5)


class RtspServer:
    """tests/rtsp_server.py on a fixed free port: start, kill, start again on the same port."""

    def __init__(self, clip: Path, *, codec: str = "h264", user: str | None = None) -> None:
        self.clip, self.codec, self.user = clip, codec, user
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None

    def url(self, credentials: str = "") -> str:
        return f"rtsp://{credentials}127.0.0.1:{self.port}/cam"

    def start(self) -> None:
        argv = [
            SYSTEM_PYTHON,
            str(LAUNCHER),
            "--port",
            str(self.port),
            "--file",
            str(self.clip),
            "--codec",
            self.codec,
        ]
        if self.user:
            argv += ["--user", self.user]
        env = {**os.environ, "RTSP_TEST_PASSWORD": PASSWORD}
        for _ in range(3):  # the port may be in TIME_WAIT a moment after a kill
            self.process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            assert self.process.stdout is not None
            if self.process.stdout.readline().strip() == "ready":
                return
            self.process.wait(10)
            time.sleep(0.5)
        raise RuntimeError(f"the RTSP server did not start: {self.process.stderr.read()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            self.kill()
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()


@pytest.fixture(scope="module")
def h264_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", 60)  # 4 s


@pytest.fixture
def rtsp_server(h264_clip: Path) -> Iterator[RtspServer]:
    server = RtspServer(h264_clip)
    server.start()
    yield server
    server.stop()


def _topic() -> str:
    return f"video-{uuid.uuid4().hex[:8]}"


def produce(settings: KafkaSettings, source: str, **options: Any) -> dict[str, Any]:
    options.setdefault("topic", _topic())
    options.setdefault("streams", 1)
    return produce_frames(
        settings,
        None,
        source,
        options.pop("topic"),
        options.pop("fps"),
        options.pop("streams"),
        options.pop("count"),
        options.pop("encoding", "jpeg"),
        **options,
    )


def camera_frames(settings: KafkaSettings, topic: str) -> list[FrameRecord]:
    (frames,) = frames_by_stream(read_topic(settings, topic)).values()
    return frames


@needs_rtsp
def test_rtsp_camera_frames_are_sampled_at_fps_shrunk_and_jpeg(
    kafka_settings: KafkaSettings, rtsp_server: RtspServer
) -> None:
    summary = produce(
        kafka_settings, rtsp_server.url(), fps=5, count=8, max_side=160, jpeg_quality=60
    )
    assert summary["frames"] == 8 and summary["source"] == rtsp_server.url()
    assert summary["reconnects"] == 0
    frames = camera_frames(kafka_settings, summary["topic"])
    assert [f.frame_index for f in frames] == list(range(8))
    for frame in frames:
        assert (frame.encoding, frame.height, frame.width, frame.channels) == ("jpeg", 120, 160, 3)
        assert frame.label is None
    shown = [clip_index(decode_frame(f, LIMITS)) for f in frames]
    # 15 fps sampled at 5: every third frame, [0, 3, 6, ...], unless the producer fell more
    # than buffer_s behind (a loaded machine) and the oldest samples were dropped, counted.
    steps = [later - earlier for earlier, later in itertools.pairwise(shown)]
    assert shown[0] == 0 and all(step > 0 and step % 3 == 0 for step in steps), shown
    assert sum(step // 3 - 1 for step in steps) <= summary["dropped"]


@needs_rtsp
def test_a_dropped_rtsp_stream_is_reconnected_and_counted(
    kafka_settings: KafkaSettings, rtsp_server: RtspServer
) -> None:
    sent = 0
    dropped = threading.Event()

    def progress(frames: int) -> None:
        nonlocal sent
        sent += frames
        if sent == 4:
            dropped.set()

    def drop_and_restart() -> None:
        dropped.wait(60)
        rtsp_server.kill()
        time.sleep(0.5)  # down a moment: the first reconnect attempts are refused
        rtsp_server.start()

    restarter = threading.Thread(target=drop_and_restart)
    restarter.start()
    try:
        summary = produce(kafka_settings, rtsp_server.url(), fps=10, count=12, progress=progress)
    finally:
        dropped.set()
        restarter.join(30)
    assert summary["frames"] == 12 and summary["reconnects"] >= 1
    frames = camera_frames(kafka_settings, summary["topic"])
    assert [f.frame_index for f in frames] == list(range(12))
    assert all((f.height, f.width) == (HEIGHT, WIDTH) for f in frames)  # native size
    shown = [clip_index(decode_frame(f, LIMITS)) for f in frames]
    # 15 fps sampled at 10: frames 0, 2 (1.5 apart) ...; after the drop the server plays the
    # clip from its start again: the frame shown goes back once.
    steps = [later - earlier for earlier, later in itertools.pairwise(shown)]
    assert shown[0] == 0 and sum(step < 0 for step in steps) >= 1, shown


@needs_rtsp
def test_rtsp_credentials_are_used_and_never_shown(
    kafka_settings: KafkaSettings,
    h264_clip: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RtspServer(h264_clip, user="alice")
    server.start()
    caplog.set_level(logging.DEBUG)
    try:
        with_password = server.url(f"alice:{PASSWORD}@")
        summary = produce(kafka_settings, with_password, fps=5, count=3)
        assert summary["frames"] == 3 and summary["source"] == server.url("***@")
        assert PASSWORD not in json.dumps(summary)
        assert PASSWORD not in repr(RtspSource(with_password, fps=5))
        with pytest.raises(SourceError) as refused:
            produce(kafka_settings, server.url(f"alice:{PASSWORD}x@"), fps=5, count=3)
        assert PASSWORD not in str(refused.value) and "***@" in str(refused.value)
        # The user's way: credentials in the environment, not on the command line.
        env = {
            "FRAMECAST_KAFKA_BOOTSTRAP": str(kafka_settings.bootstrap_servers),
            USER_ENV: "alice",
            PASSWORD_ENV: PASSWORD,
        }
        topic = _topic()
        result = run_cli(
            "produce",
            "--source",
            server.url(),
            "--topic",
            topic,
            "--fps",
            "5",
            "--count",
            "2",
            "--max-side",
            "96",
            "--jpeg-quality",
            "50",
            "--json",
            home=tmp_path,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["frames"] == 2
        frames = camera_frames(kafka_settings, topic)
        assert [(f.width, f.height) for f in frames] == [(96, 72)] * 2
        assert PASSWORD not in result.stdout + result.stderr
    finally:
        server.stop()
    assert PASSWORD not in caplog.text


def test_h265_mkv_file_frames_reach_the_topic_in_order(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    clip = write_clip(tmp_path / "clip.mkv", 12, codec="libx265")
    summary = produce(kafka_settings, str(clip), fps=0, count=10, encoding="png")
    frames = camera_frames(kafka_settings, summary["topic"])
    assert [f.frame_index for f in frames] == list(range(10))
    assert all((f.encoding, f.height, f.width) == ("png", HEIGHT, WIDTH) for f in frames)
    assert [clip_index(decode_frame(f, LIMITS)) for f in frames] == list(range(10))


def test_a_frame_too_large_for_the_topic_is_refused_naming_the_limit(
    kafka_settings: KafkaSettings, h264_clip: Path
) -> None:
    topic = _topic()
    produce(  # the topic is made with a 64 KiB max.message.bytes ...
        kafka_settings,
        str(h264_clip),
        topic=topic,
        fps=0,
        count=1,
        max_side=64,
        topic_settings=TopicSettings(max_message_bytes=64 * 1024),
    )
    with pytest.raises(ProducerError) as refused:  # ... which a raw 320x240 frame is over
        produce(kafka_settings, str(h264_clip), topic=topic, fps=0, count=2, encoding="raw")
    message = str(refused.value)
    assert "frame 0 of cam-0" in message and "320x240 raw" in message
    assert f"max.message.bytes of topic {topic!r} (65,536 bytes)" in message
    size = re.search(r"makes a ([\d,]+)-byte message", message)
    assert size is not None and 320 * 240 * 3 < int(size[1].replace(",", "")) < 240_000
    assert len(read_topic(kafka_settings, topic)) == 1  # nothing more was sent


@needs_rtsp
def test_a_camera_that_stays_down_is_given_up_with_the_last_error(
    rtsp_server: RtspServer,
) -> None:
    source = RtspSource(rtsp_server.url(), fps=5, give_up_s=1.5)
    frames = source.stream(0)
    try:
        next(frames)
        rtsp_server.kill()
        with pytest.raises(SourceError, match=r"did not come back within 1\.5 s.*last error"):
            for _ in range(100):  # what was buffered, then the error
                next(frames)
    finally:
        source.close()
    assert source.reconnects == 0
