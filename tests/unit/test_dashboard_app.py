"""The dashboard's web side without a broker: access token, cookie, same-origin frames, Host
check, and the settings that configure it (the page in a real browser against a real stream
is tests/integration/test_dashboard.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import uvicorn

from cluster.dashboard.app import COOKIE, create_app
from cluster.dashboard.state import DashboardState
from cluster.exceptions import SettingsError
from cluster.processes import free_port
from cluster.settings import load_settings
from serving.frames import FrameRecord

TOKEN = "a-long-enough-token-0123"
T0 = 1_700_000_000 * 1_000_000_000


def state_with_a_frame() -> DashboardState:
    state = DashboardState()
    pixels = (np.arange(28 * 28) % 255).astype(np.uint8).tobytes()
    state.add_frame(FrameRecord("cam/1", 0, T0, "raw", 28, 28, 1, pixels, None), T0)
    return state


@contextlib.contextmanager
def client(
    state: DashboardState, token: str | None = None, host: str = "127.0.0.1"
) -> Iterator[httpx.Client]:
    """The app served by uvicorn on a free port of 127.0.0.1 (``host`` is what it believes it
    is bound to), and an HTTP client of it."""
    port = free_port()
    app = create_app(state, token=token, update_ms=200, host=host)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as web:
            yield web
    finally:
        server.should_exit = True
        thread.join(10)


def test_without_a_token_the_page_and_its_data_are_served() -> None:
    with client(state_with_a_frame()) as web:
        page = web.get("/")
        assert page.status_code == 200
        assert "uPlot.iife.min.js" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert web.get("/static/uPlot.iife.min.js").status_code == 200
        snapshot = web.get("/api/snapshot").json()
        assert snapshot["cameras"][0]["id"] == "cam/1"
        image = web.get("/frame", params={"id": "cam/1"})
        assert (image.status_code, image.headers["content-type"]) == (200, "image/png")
        assert image.headers["cross-origin-resource-policy"] == "same-origin"
        assert web.get("/frame", params={"id": "nobody"}).status_code == 404


def test_frames_and_events_are_refused_to_other_sites() -> None:
    with client(state_with_a_frame()) as web:
        for path in ("/frame?id=cam/1", "/api/snapshot", "/events", "/static/app.js"):
            answer = web.get(path, headers={"Sec-Fetch-Site": "cross-site"})
            assert answer.status_code == 403, path
        same = web.get("/frame?id=cam/1", headers={"Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200


def test_a_token_is_needed_and_accepted_as_bearer_or_once_in_the_url() -> None:
    with client(state_with_a_frame(), token=TOKEN) as web:
        assert web.get("/").status_code == 401
        assert web.get("/api/snapshot").status_code == 401
        assert web.get("/frame?id=cam/1").status_code == 401
        assert web.get("/healthz").status_code == 200
        assert web.get("/", params={"token": "wrong-token-0123456789"}).status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert web.get("/api/snapshot", headers=bearer).status_code == 200
        # ?token= once: a cookie (not the token itself) and a redirect that drops it
        answer = web.get("/", params={"token": TOKEN})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/"
        cookie = answer.headers["set-cookie"]
        assert "httponly" in cookie.lower()
        assert "samesite=strict" in cookie.lower()
        assert TOKEN not in cookie
        assert web.cookies.get(COOKIE)
        assert web.get("/").status_code == 200
        assert web.get("/frame?id=cam/1").status_code == 200
        web.cookies.set(COOKIE, "forged")
        assert web.get("/api/snapshot").status_code == 401


def test_bound_to_this_machine_other_host_names_are_refused() -> None:
    with client(DashboardState()) as web:
        assert web.get("/", headers={"Host": "evil.example:8080"}).status_code == 400
        assert web.get("/", headers={"Host": "localhost:8080"}).status_code == 200
        assert web.get("/healthz", headers={"Host": "evil.example"}).status_code == 400
    with client(DashboardState(), token=TOKEN, host="0.0.0.0") as web:  # noqa: S104
        headers = {"Host": "dashboard.example", "Authorization": f"Bearer {TOKEN}"}
        assert web.get("/", headers=headers).status_code == 200


def test_dashboard_settings_are_checked_at_start_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings()
    assert (settings.dashboard.host, settings.dashboard.port) == ("127.0.0.1", 8080)
    assert settings.dashboard.token is None
    monkeypatch.setenv("FRAMECAST_DASHBOARD_TOKEN", "short")
    with pytest.raises(SettingsError, match=r"dashboard\.token"):
        load_settings()
    monkeypatch.setenv("FRAMECAST_DASHBOARD_TOKEN", TOKEN)
    settings = load_settings(dashboard={"port": 9001})
    assert settings.dashboard.port == 9001
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings.redacted())
    with pytest.raises(SettingsError, match=r"dashboard\.update_ms"):
        load_settings(dashboard={"update_ms": 10})
