"""Deploy, inspect and shut down the framecast Serve application on a Ray cluster."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx

from serving.artifacts import load_artifact
from serving.config import ServeSettings, StorageSettings
from serving.exceptions import DeployError


def _connect(address: str | None, namespace: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False
        )


def deploy(
    artifact_dir: Path | str,
    settings: ServeSettings,
    *,
    address: str | None,
    namespace: str = "framecast",
    timeout_s: float = 300.0,
    storage: StorageSettings | None = None,
) -> dict[str, Any]:
    """Deploy (or update in place) the app serving artifact_dir (a directory, or an s3://,
    gs://, file:// URI read with ``storage``); return once /healthz is ok."""
    from ray import serve

    from serving.app import app
    from serving.storage import parse_location, verify_remote

    # Refuse a bad URI or a tampered artifact before sending anything: a directory is read
    # and hashed here, an object store's objects are streamed through sha256 (nothing kept).
    parsed = parse_location(artifact_dir)
    if isinstance(parsed, str):
        location, storage = str(load_artifact(parsed).directory), None
    else:
        storage = storage if storage is not None and storage.configured else None
        verify_remote(parsed, storage or StorageSettings())
        location = str(parsed)
    _connect(address, namespace)
    # The proxy's own timeout is a backstop a little above the replica's, which answers first
    # with a JSON reason (a client can lift the proxy's with x-request-timeout-seconds).
    # Serve keeps the http_options it was first started with.
    serve.start(
        http_options={
            "host": settings.http_host,
            "port": settings.http_port,
            "request_timeout_s": settings.http_request_timeout_s + 5,
        }
    )
    # The settings go as objects (the token stays a SecretStr); the replicas get only its HMAC.
    # Storage credentials (SecretStr) go only with an object-store URI, and only when set
    # (unset: the replicas use their own environment's).
    application = app(
        {"artifact_dir": location, "serve": settings.model_dump(), "storage": storage}
    )
    started = time.monotonic()
    serve.run(
        application, name=settings.app_name, route_prefix=settings.route_prefix, blocking=False
    )
    health = wait_healthy(settings, timeout_s=max(10.0, timeout_s - (time.monotonic() - started)))
    return {
        "app": settings.app_name,
        "url": settings.http_url + settings.route_prefix.rstrip("/"),
        "model": health.get("model"),
        "seconds": time.monotonic() - started,
    }


def wait_healthy(settings: ServeSettings, timeout_s: float) -> dict[str, Any]:
    """Poll GET /healthz until it answers 200; raise DeployError with the last answer."""
    url = settings.http_url + settings.route_prefix.rstrip("/") + "/healthz"
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=10)
            if response.status_code == 200:
                return dict(response.json())
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        except httpx.HTTPError as error:
            last = str(error)
        time.sleep(0.5)
    raise DeployError(f"{url} did not become healthy within {timeout_s:.0f}s: {last}")


def status(*, address: str | None, namespace: str = "framecast") -> dict[str, Any]:
    """Applications, their deployments and replica states."""
    from ray import serve

    _connect(address, namespace)
    out: dict[str, Any] = {}
    applications = serve.status().applications
    placed = replica_placement() if applications else {}
    for name, app_status in applications.items():
        out[name] = {
            "status": str(getattr(app_status.status, "value", app_status.status)),
            "message": app_status.message,
            "deployments": {
                dep: {
                    "status": str(getattr(d.status, "value", d.status)),
                    "replicas": {
                        str(getattr(k, "value", k)): v for k, v in d.replica_states.items()
                    },
                    "replica_nodes": placed.get((name, dep), []),
                }
                for dep, d in app_status.deployments.items()
            },
        }
    return out


def replica_placement() -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each live Serve replica's node, by (app, deployment): Ray's state API lists the
    ``ServeReplica:<app>:<deployment>`` actors with their node ids (serve.status() has none).

    Needs a connected driver; its cluster's dashboard answers the state API.
    """
    import ray
    from ray.util.state import list_actors

    url = str(ray._private.worker.get_dashboard_url())  # type: ignore[no-untyped-call]
    actors = list_actors(
        address=url if url.startswith("http") else f"http://{url}",
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    placed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for actor in actors:
        parts = str(actor.class_name).split(":")
        if len(parts) != 3 or parts[0] != "ServeReplica":
            continue
        placed.setdefault((parts[1], parts[2]), []).append(
            {
                "replica_id": str(actor.name).rsplit("#", 1)[-1],
                "actor_id": actor.actor_id,
                "node_id": actor.node_id,
                "pid": actor.pid,
            }
        )
    for replicas in placed.values():
        replicas.sort(key=lambda r: (str(r["node_id"]), r["replica_id"]))
    return placed


def shutdown(app_name: str | None, *, address: str | None, namespace: str = "framecast") -> None:
    """Delete one application, or shut Serve down entirely when app_name is None."""
    from ray import serve

    _connect(address, namespace)
    if app_name is None:
        serve.shutdown()  # type: ignore[no-untyped-call]  # untyped in Ray
    else:
        serve.delete(app_name)
