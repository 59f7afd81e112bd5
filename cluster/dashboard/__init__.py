"""``framecast dashboard``: a live web view of the streams (cameras, labels, latency, lag,
dead letters, the model), read from Kafka as a group of its own.

:func:`open_dashboard` assembles it from the settings; see docs/dashboard.md.
"""

from __future__ import annotations

from cluster.dashboard.app import Dashboard, create_app, render_picture
from cluster.dashboard.feed import DashboardFeed, FeedTopics
from cluster.dashboard.state import DashboardState
from cluster.settings import FramecastSettings

__all__ = [
    "Dashboard",
    "DashboardFeed",
    "DashboardState",
    "FeedTopics",
    "create_app",
    "open_dashboard",
    "render_picture",
]


def open_dashboard(
    settings: FramecastSettings,
    bootstrap: str,
    topics: FeedTopics | None = None,
    *,
    classifier_group: str | None = None,
    from_beginning: bool = False,
    serve_url: str | None = None,
) -> Dashboard:
    """The dashboard over ``topics`` (default: the settings' ``topics`` section), watching the
    lag of ``classifier_group`` (default: ``stream.group``); not started yet."""
    board = settings.dashboard
    if topics is None:
        names = settings.topics
        topics = FeedTopics(names.frames, names.labels, names.latency, names.dlq)
    state = DashboardState(history_s=board.history_s)
    feed = DashboardFeed(
        settings.kafka, bootstrap, topics, state, group=board.group,
        classifier_group=classifier_group or settings.stream.group,
        from_beginning=from_beginning, serve_url=serve_url,
    )
    token = board.token.get_secret_value() if board.token is not None else None
    return Dashboard(state, feed, host=board.host, port=board.port, token=token,
                     update_ms=board.update_ms)
