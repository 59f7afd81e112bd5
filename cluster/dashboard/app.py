"""The dashboard's web side: a Starlette app on uvicorn, live updates by server-sent events.

Routes (all behind the access check when a token is set, except ``/healthz``):

* ``GET /`` the page (static/index.html; its script, styles and chart library are files of
  this package: no CDN, it works offline);
* ``GET /events`` ``text/event-stream``: one snapshot (JSON) every ``update_ms``;
* ``GET /api/snapshot`` the current snapshot, for scripts;
* ``GET /frame?id=<stream_id>`` a camera's latest sampled frame (JPEG/PNG as sent, raw pixels
  as PNG or JPEG), to this page only: same-origin fetches (``Sec-Fetch-Site``),
  ``Cross-Origin-Resource-Policy: same-origin``, never cached.

Access: with ``dashboard.token`` set, a request shows it as ``Authorization: Bearer <token>``
or, once, as ``/?token=<token>``, which answers with an HttpOnly, SameSite=Strict cookie (an
HMAC of the token, never the token) and a redirect that drops it from the address bar. Every
comparison is ``hmac.compare_digest``. Bound to 127.0.0.1 (the default) the app also refuses
Host headers other than this machine's names (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cluster.dashboard.feed import DashboardFeed
from cluster.dashboard.state import DashboardState, Picture
from cluster.exceptions import DashboardError
from serving.frames import FrameRecord

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "framecast_dashboard"
_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def render_picture(frame: FrameRecord) -> tuple[bytes, str] | None:
    """A frame as an image the browser shows: JPEG/PNG as they came, raw pixels as PNG
    (small frames) or JPEG (large ones, shrunk to 480 px); None if it is neither."""
    data = frame.data
    if data.startswith(_PNG):
        return data, "image/png"
    if data.startswith(_JPEG):
        return data, "image/jpeg"
    if frame.encoding != "raw":
        return None
    from PIL import Image

    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    mode = modes.get(frame.channels)
    if mode is None or frame.height <= 0 or frame.width <= 0:
        return None
    if len(data) != frame.height * frame.width * frame.channels:
        return None
    image = Image.frombytes(mode, (frame.width, frame.height), data)
    out = io.BytesIO()
    if frame.height * frame.width <= 256 * 256:
        image.save(out, format="PNG", compress_level=1)
        return out.getvalue(), "image/png"
    image.thumbnail((480, 480))
    image.convert("RGB").save(out, format="JPEG", quality=80)
    return out.getvalue(), "image/jpeg"


class _Access:
    """Token check and security headers, around every route (pure ASGI: the event stream
    passes through unbuffered)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.cookie = (
            hmac.new(self.token, b"framecast-dashboard-cookie", hashlib.sha256).hexdigest()
            if self.token else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_SECURITY_HEADERS]
            await send(message)

        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path != "/healthz":
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, secured)
                return
        await self.app(scope, receive, secured)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> Response | None:
        site = headers.get("sec-fetch-site")
        if (scope["path"] != "/" and site is not None and site not in ("same-origin", "none")):
            return PlainTextResponse("cross-site requests are refused", status_code=403)
        if self.token is None or self.cookie is None:
            return None
        bearer = headers.get("authorization", "")
        if bearer[:7].lower() == "bearer " and hmac.compare_digest(
            bearer[7:].strip().encode(), self.token
        ):
            return None
        cookie = SimpleCookie()
        with contextlib.suppress(Exception):  # a malformed cookie header is no cookie
            cookie.load(headers.get("cookie", ""))
        morsel = cookie.get(COOKIE)
        if morsel is not None and hmac.compare_digest(morsel.value.encode(), self.cookie.encode()):
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        offered = query.get("token", [""])[0].encode()
        if scope["path"] == "/" and offered and hmac.compare_digest(offered, self.token):
            # Once: the token becomes a cookie and leaves the address bar (and the history).
            answer = RedirectResponse("/", status_code=303)
            answer.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict",
                              secure=scope.get("scheme") == "https", path="/")
            return answer
        return PlainTextResponse(
            "401: this dashboard needs its token (dashboard.token): open /?token=<token> once, "
            "or send Authorization: Bearer <token>",
            status_code=401, headers={"WWW-Authenticate": 'Bearer realm="framecast-dashboard"'},
        )


class _Snapshots:
    """One snapshot every ``interval_s`` while anyone watches, shared by every event stream."""

    def __init__(self, state: DashboardState, interval_s: float) -> None:
        self.state = state
        self.interval_s = interval_s
        self.payload = b"{}"
        self.seq = 0
        self.watchers = 0
        self.closing = False
        self.changed: asyncio.Condition | None = None

    def build(self) -> bytes:
        with self.state.lock:
            snapshot = self.state.snapshot(time.time_ns())
        snapshot["seq"] = self.seq
        snapshot["update_ms"] = round(self.interval_s * 1000)
        return orjson.dumps(snapshot)

    async def run(self) -> None:
        self.changed = asyncio.Condition()
        while True:
            if self.closing:  # wake every stream, so that each one ends
                async with self.changed:
                    self.changed.notify_all()
                return
            if self.watchers:
                payload = self.build()
                async with self.changed:
                    self.payload, self.seq = payload, self.seq + 1
                    self.changed.notify_all()
            await asyncio.sleep(self.interval_s)

    async def stream(self) -> AsyncIterator[bytes]:
        assert self.changed is not None  # noqa: S101 - set by run() at start-up
        self.watchers += 1
        try:
            seen = -1
            yield b"retry: 2000\n\n"
            while not self.closing:
                async with self.changed:
                    await self.changed.wait_for(self._newer(seen))
                    payload, seen = self.payload, self.seq
                if seen > 0:
                    yield b"data: " + payload + b"\n\n"
        finally:
            self.watchers -= 1

    def _newer(self, seen: int) -> Callable[[], bool]:
        return lambda: self.seq != seen or self.closing

    async def close(self) -> None:
        self.closing = True
        if self.changed is not None:
            async with self.changed:
                self.changed.notify_all()


def _uvicorn_server(app: ASGIApp, snapshots: _Snapshots, host: str, port: int) -> Any:
    """uvicorn's server, which first ends the event streams when it is asked to stop: they
    never end by themselves, and uvicorn waits for open responses before it stops."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            snapshots.closing = True  # the next tick wakes the streams, which end
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=5, server_header=False,
    ))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    state: DashboardState,
    *,
    token: str | None,
    update_ms: int,
    host: str = "127.0.0.1",
    snapshots: _Snapshots | None = None,
) -> ASGIApp:
    """The dashboard's ASGI app over ``state`` (which the feed fills)."""
    snapshots = snapshots or _Snapshots(state, update_ms / 1000)
    rendered: dict[str, tuple[int, bytes, str]] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(snapshots.run())
        try:
            yield
        finally:
            await snapshots.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def events(_request: Request) -> Response:
        return StreamingResponse(
            snapshots.stream(), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def snapshot(_request: Request) -> Response:
        return Response(snapshots.build(), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    async def frame(request: Request) -> Response:
        stream_id = request.query_params.get("id", "")
        with state.lock:
            picture: Picture | None = state.picture(stream_id)
        if picture is None:
            return PlainTextResponse("no frame of this camera yet", status_code=404)
        cached = rendered.get(stream_id)
        if cached is None or cached[0] != picture.seq:
            frame = picture.frame
            # Small frames are encoded here (~0.1 ms); a large raw one in a worker thread.
            small = frame.encoding != "raw" or frame.height * frame.width <= 256 * 256
            image = render_picture(frame) if small else await run_in_threadpool(
                render_picture, frame
            )
            if image is None:
                return PlainTextResponse("this frame is not an image", status_code=415)
            cached = rendered[stream_id] = (picture.seq, *image)
        return Response(cached[1], media_type=cached[2], headers={"Cache-Control": "no-store"})

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    middleware = []
    if _loopback(host):
        # Bound to this machine: a page elsewhere must not reach it through a DNS name that
        # resolves here (DNS rebinding).
        middleware.append(Middleware(TrustedHostMiddleware,
                                     allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"]))
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/events", events),
            Route("/api/snapshot", snapshot),
            Route("/frame", frame),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    return _Access(app, token)


class Dashboard:
    """The whole dashboard: the state, the Kafka feed that fills it, and uvicorn serving the
    app. :meth:`serve` in the foreground (the CLI) or :meth:`start` in a thread (the demo,
    the tests); :meth:`stop` ends both."""

    def __init__(
        self, state: DashboardState, feed: DashboardFeed, *, host: str, port: int,
        token: str | None, update_ms: int,
    ) -> None:
        self.state, self.feed, self.host, self.port = state, feed, host, port
        self.snapshots = _Snapshots(state, update_ms / 1000)
        self.app = create_app(state, token=token, update_ms=update_ms, host=host,
                              snapshots=self.snapshots)
        self.server = _uvicorn_server(self.app, self.snapshots, host, port)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where a browser opens it (the token is not part of it)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def _check_port(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as error:
                raise DashboardError(
                    f"the dashboard cannot listen on {self.host}:{self.port}: {error.strerror} "
                    "(set --port or dashboard.port)"
                ) from None

    def serve(self) -> None:
        """Feed and serve until SIGINT/SIGTERM (main thread only), then return."""
        self._check_port()
        # uvicorn hands a signal it caught on to the handler it found once it has stopped:
        # this one, so that the feed is stopped and the command ends normally.
        previous = {
            sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        self.feed.start()
        try:
            self.server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.feed.stop()

    def start(self, timeout_s: float = 30.0) -> Dashboard:
        """Feed and serve in threads; returns once the page is served."""
        self._check_port()
        self.feed.start()
        self.thread = threading.Thread(target=self.server.run, name="dashboard-http",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DashboardError(f"the dashboard did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.snapshots.closing = True
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        self.feed.stop()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
