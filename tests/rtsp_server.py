"""A real RTSP server for the tests: GStreamer's gst-rtsp-server serving one video file.

Run with Debian's ``/usr/bin/python3`` (python3-gi and gir1.2-gst-rtsp-server-1.0 from
``make setup``), not the project's venv::

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --file clip.mp4 [--path /cam] [--codec h265]
        [--user U]   (the password comes from the environment: RTSP_TEST_PASSWORD)

Like GStreamer's ``test-launch`` example: every client that connects gets its own pipeline
that plays the file from its start, in real time (H.264 or H.265, in MP4 or MKV), packed as
RTP. With ``--user`` the mount asks for HTTP basic credentials. Prints ``ready`` on stdout
once it listens; stops on SIGTERM/SIGINT. ``--check`` exits 0 when everything it needs is
installed (the GStreamer elements below), 1 saying what is missing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def launch_line(path: str, codec: str) -> str:
    """The media pipeline for a file: demuxer by container, parser and payloader by codec."""
    demux = "matroskademux" if path.endswith((".mkv", ".webm")) else "qtdemux"
    return (
        f'( filesrc location="{path}" ! {demux} ! {codec}parse ! '
        f"rtp{codec}pay name=pay0 pt=96 config-interval=-1 )"
    )


ELEMENTS = (
    "filesrc",
    "qtdemux",
    "matroskademux",
    "h264parse",
    "h265parse",
    "rtph264pay",
    "rtph265pay",
)


def missing_elements() -> list[str]:
    Gst.init(None)
    return [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        missing = missing_elements()
        if missing:
            print(f"missing GStreamer elements: {', '.join(missing)}", file=sys.stderr)
        return 1 if missing else 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--path", default="/cam")
    parser.add_argument("--codec", choices=("h264", "h265"), default="h264")
    parser.add_argument("--user", default=None)
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(os.path.abspath(args.file), args.codec))
    factory.set_shared(False)
    if args.user:
        password = os.environ.get("RTSP_TEST_PASSWORD", "")
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_permission_for_role("viewer", "media.factory.access", True)
        permissions.add_permission_for_role("viewer", "media.factory.construct", True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    print("ready", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
