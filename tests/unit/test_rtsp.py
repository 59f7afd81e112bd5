"""rtsp:// sources without a camera: URLs, credentials, options, a camera that is not there."""

from __future__ import annotations

import logging

import pytest

from cluster.processes import free_port
from streams.exceptions import SourceError
from streams.rtsp import (
    PASSWORD_ENV,
    USER_ENV,
    RtspSource,
    is_stream_url,
    redact_url,
    url_with_credentials,
)
from streams.video import fit_within, open_source


def test_credentials_are_redacted_wherever_a_url_appears() -> None:
    assert redact_url("rtsp://alice:pw@cam.local:554/live") == "rtsp://***@cam.local:554/live"
    assert redact_url("rtsp://token@cam/x") == "rtsp://***@cam/x"
    assert redact_url("rtsp://cam.local/live") == "rtsp://cam.local/live"
    text = "[Errno 111] Connection refused: 'rtsp://bob:p%40ss@10.0.0.2/a' then RTSPS://u:v@h/b"
    assert redact_url(text) == (
        "[Errno 111] Connection refused: 'rtsp://***@10.0.0.2/a' then RTSPS://***@h/b"
    )


def test_credentials_from_the_environment_go_into_a_url_without_any() -> None:
    env = {USER_ENV: "al ice", PASSWORD_ENV: "p@ss:word"}
    assert url_with_credentials("rtsp://cam:8554/live", env) == (
        "rtsp://al%20ice:p%40ss%3Aword@cam:8554/live"
    )
    assert url_with_credentials("rtsp://x:y@cam/live", env) == "rtsp://x:y@cam/live"
    assert url_with_credentials("rtsp://cam/live", {}) == "rtsp://cam/live"


def test_stream_urls_and_native_size() -> None:
    assert is_stream_url("rtsp://cam/x") and is_stream_url("RTSPS://cam/x")
    assert not is_stream_url("clip.mp4") and not is_stream_url("synthetic")
    assert fit_within(1920, 1080, 0) == (1920, 1080)


def test_bad_options_fail_at_start_up_naming_them() -> None:
    with pytest.raises(SourceError, match=r"max_side must be 0 \(native\) or >= 2.*transport"):
        RtspSource("rtsp://cam/x", fps=5, max_side=1, transport="http")
    with pytest.raises(SourceError, match="give_up_s must be > 0"):
        RtspSource("rtsp://cam/x", fps=5, give_up_s=0)


def test_a_camera_that_is_not_there_fails_at_once_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"rtsp://alice:Hunter2-pw@127.0.0.1:{free_port()}/cam"
    source = open_source(url, fps=5)
    assert isinstance(source, RtspSource)
    assert "Hunter2" not in repr(source) + source.name
    with pytest.raises(SourceError, match=r"cannot open rtsp://\*\*\*@127\.0\.0\.1") as refused:
        next(source.stream(0))
    source.close()
    assert "Hunter2" not in str(refused.value) + caplog.text


def test_the_summary_line_tells_reconnects_and_drops_of_a_live_source() -> None:
    from streams.producers import summary_line

    summary = {
        "frames": 30, "streams": 1, "source": "rtsp://***@cam/x", "topic": "frames",
        "messages": 30, "bytes": 1000, "seconds": 2.0, "fps": 15.0, "format": "arrow",
        "encoding": "jpeg", "reconnects": 2, "dropped": 3,
    }  # fmt: skip
    assert summary_line(summary).endswith("(arrow, jpeg); 2 reconnect(s), 3 frame(s) dropped")
    del summary["reconnects"], summary["dropped"]
    assert summary_line(summary).endswith("(arrow, jpeg)")
