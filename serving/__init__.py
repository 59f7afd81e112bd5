"""framecast.serving — the Ray Serve application and the artifact format it serves."""

from serving.config import ServeSettings

__all__ = ["ServeSettings"]
