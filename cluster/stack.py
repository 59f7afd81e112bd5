"""The embedded local stack: one Kafka broker and one Ray head, started and stopped together.

When the settings point at an existing Kafka cluster or Ray cluster, that part is used as
it is and never started or stopped here. ``up(sasl=True)`` secures the embedded broker
(SASL_SSL, SCRAM users, ACLs; see :mod:`cluster.kafka_security`), for good.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cluster import kafka_security
from cluster.exceptions import BrokerStartError, RayHeadError
from cluster.kafka_broker import BrokerSecurity, EmbeddedKafka, broker_answers_metadata
from cluster.ray_head import LocalRayHead, use_ray_auth_env
from cluster.ray_nodes import NODE_LABEL, LocalRayCluster
from cluster.settings import FramecastSettings

log = logging.getLogger(__name__)


def embedded_kafka(
    settings: FramecastSettings,
    port: int | None = None,
    *,
    security: BrokerSecurity | None = None,
) -> EmbeddedKafka:
    """The embedded broker described by settings (``security`` only matters to start it)."""
    return EmbeddedKafka(
        settings.home,
        libs_dir=settings.kafka_libs_dir,
        port=port or settings.kafka.embedded_port,
        heap_mb=settings.kafka.embedded_heap_mb,
        security=security,
    )


def local_ray_head(settings: FramecastSettings) -> LocalRayHead:
    """The local Ray head described by settings."""
    return LocalRayHead(settings.home, settings.ray)


def kafka_bootstrap(settings: FramecastSettings) -> str:
    """Where clients reach Kafka: the external cluster, or the running embedded broker."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    info = embedded_kafka(settings).info()
    return info.bootstrap_servers if info else f"127.0.0.1:{settings.kafka.embedded_port}"


@contextlib.contextmanager
def ray_connection(settings: FramecastSettings, address: str | None = None) -> Iterator[str]:
    """ray.init() against the configured cluster (with the local head's token), then shutdown.

    External clusters use the caller's own RAY_AUTH_* environment, as Ray documents.
    """
    import ray

    target = address or ray_address(settings)
    if target is None:
        raise RayHeadError("no Ray cluster: run `framecast up` or pass --ray-address")
    if not settings.ray.address:
        use_ray_auth_env(local_ray_head(settings).client_env())
    ray.init(
        address=target,
        namespace=settings.ray.namespace,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        yield target
    finally:
        ray.shutdown()


def ray_address(settings: FramecastSettings) -> str | None:
    """Where Ray is: the external cluster, the running local head, or None."""
    if settings.ray.address:
        return settings.ray.address
    info = local_ray_head(settings).info()
    return info.address if info else None


@dataclass
class StackEvent:
    """One thing `up`/`down` did, for the CLI to print."""

    component: str
    action: str
    detail: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def up(
    settings: FramecastSettings,
    *,
    kafka: bool = True,
    ray: bool = True,
    kafka_port: int | None = None,
    sasl: bool = False,
) -> list[StackEvent]:
    """Start what is not running yet (idempotent); returns what happened.

    ``sasl`` secures the embedded broker (a home once secured stays so, ``sasl`` or not).
    """
    events: list[StackEvent] = []
    if kafka:
        if settings.kafka.bootstrap_servers:
            if sasl:
                raise BrokerStartError(
                    "--sasl secures the embedded broker; Kafka here is the external cluster "
                    f"at {settings.kafka.bootstrap_servers}, whose security is its own"
                )
            events.append(StackEvent("kafka", "external", settings.kafka.bootstrap_servers))
        else:
            events.append(_up_kafka(settings, kafka_port, sasl))
    if ray:
        if settings.ray.address:
            events.append(StackEvent("ray", "external", settings.ray.address))
        else:
            head = local_ray_head(settings)
            already_head = head.info()
            started = time.monotonic()
            head_info = head.start()
            events.append(
                StackEvent(
                    "ray",
                    "running" if already_head else "started",
                    head_info.address,
                    time.monotonic() - started,
                    {"dashboard": head_info.dashboard_url},
                )
            )
            if settings.ray.nodes > 1:
                events.append(_up_ray_workers(head, head_info.address, settings.ray.nodes))
    return events


def _up_ray_workers(head: LocalRayHead, address: str, nodes: int) -> StackEvent:
    cluster = LocalRayCluster(head)
    already = {info.index for info in cluster.workers()}
    started = time.monotonic()
    infos = cluster.start_workers(address, nodes)
    new = [info.name for info in infos if info.index not in already]
    return StackEvent(
        "ray-workers",
        "started" if new else "running",
        f"{len(infos)} worker node(s) joined {address}"
        + (f" (started {', '.join(new)})" if new else ""),
        time.monotonic() - started,
        {"workers": [info.name for info in infos], "num_cpus": head.settings.worker_cpus},
    )


def _up_kafka(settings: FramecastSettings, port: int | None, sasl: bool) -> StackEvent:
    secure = sasl or kafka_security.enabled(settings.home)
    broker = embedded_kafka(settings, port)
    already = broker.info()
    if already is not None and secure and already.security_protocol != "SASL_SSL":
        raise BrokerStartError(
            f"the embedded broker (pid {already.pid}) runs without SASL; stop it with "
            "`framecast down`, then `framecast up --sasl`"
        )
    security = None
    if secure and already is None:
        try:
            security = kafka_security.broker_security(settings.home, settings.topics)
        except (OSError, ValueError) as error:
            raise BrokerStartError(f"cannot prepare the broker's SASL/TLS files: {error}") from None
    started = time.monotonic()
    info = embedded_kafka(settings, port, security=security).start()
    detail = info.bootstrap_servers
    if info.security_protocol == "SASL_SSL":
        detail += (
            f" (SASL_SSL, {kafka_security.MECHANISM} user {kafka_security.APP_USER!r}, ACLs; "
            f"credentials in {kafka_security.credentials_file(settings.home)})"
        )
    return StackEvent(
        "kafka",
        "running" if already else "started",
        detail,
        time.monotonic() - started,
        {"pid": info.pid, "security_protocol": info.security_protocol},
    )


def down(settings: FramecastSettings, *, kafka: bool = True, ray: bool = True) -> list[StackEvent]:
    """Stop the embedded parts that run (idempotent); external clusters are left alone."""
    events: list[StackEvent] = []
    if ray and not settings.ray.address:
        started = time.monotonic()
        head = local_ray_head(settings)
        workers = LocalRayCluster(head).stop_workers()
        if workers:
            events.append(
                StackEvent(
                    "ray-workers", "stopped", f"{len(workers)} worker node(s)",
                    time.monotonic() - started,
                )
            )
            started = time.monotonic()
        stopped = head.stop()
        events.append(
            StackEvent(
                "ray", "stopped" if stopped else "not running", "", time.monotonic() - started
            )
        )
    if kafka and not settings.kafka.bootstrap_servers:
        started = time.monotonic()
        stopped = embedded_kafka(settings).stop()
        events.append(
            StackEvent(
                "kafka", "stopped" if stopped else "not running", "", time.monotonic() - started
            )
        )
    return events


@contextlib.contextmanager
def session(
    settings: FramecastSettings,
    *,
    kafka: bool = True,
    ray: bool = True,
    keep: bool = False,
    on_event: Callable[[StackEvent], None] | None = None,
) -> Iterator[list[StackEvent]]:
    """The stack up for the length of a ``with`` block, then as it was before: what this
    session started is stopped again (unless ``keep``); what was running stays running.
    Yields the start-up events."""
    was_up = {
        "kafka": embedded_kafka(settings).info() is not None,
        "ray": local_ray_head(settings).info() is not None,
    }
    started = {"kafka": kafka and not was_up["kafka"], "ray": ray and not was_up["ray"]}
    try:
        events = up(settings, kafka=kafka, ray=ray)
        for event in events:
            if on_event is not None:
                on_event(event)
        yield events
    finally:
        if not keep:
            down(settings, kafka=started["kafka"], ray=started["ray"])


def status(settings: FramecastSettings, *, probe: bool = True) -> dict[str, Any]:
    """Effective settings (secrets redacted), broker health, topics, Ray resources, Serve apps."""
    result: dict[str, Any] = {"settings": settings.redacted()}
    result["kafka"] = _kafka_status(settings, probe)
    result["ray"] = _ray_status(settings, probe)
    serve_apps = result["ray"].pop("serve_applications", None)
    result["serve"] = {"http_url": settings.serve.http_url, "applications": serve_apps}
    return result


def _kafka_status(settings: FramecastSettings, probe: bool) -> dict[str, Any]:
    from streams.client import admin_client
    from streams.exceptions import StreamsError
    from streams.topics import describe_topics

    external = bool(settings.kafka.bootstrap_servers)
    info = None if external else embedded_kafka(settings).info()
    bootstrap = kafka_bootstrap(settings)
    out: dict[str, Any] = {
        "mode": "external" if external else "embedded",
        "bootstrap_servers": bootstrap,
        "running": external or info is not None,
        "pid": info.pid if info else None,
        "security_protocol": (
            info.security_protocol if info else settings.kafka.security_protocol
        ),
        "healthy": False,
        "topics": [],
    }
    if probe and out["running"]:
        timeout_s = min(settings.kafka.request_timeout_ms, 5000) / 1000
        out["healthy"] = broker_answers_metadata(
            settings.kafka.rdkafka_config(bootstrap), timeout_s
        )
        if out["healthy"]:
            try:
                with admin_client(settings.kafka, bootstrap) as admin:
                    out["topics"] = describe_topics(admin)
            except StreamsError as error:
                out["error"] = str(error)
    return out


def _ray_status(settings: FramecastSettings, probe: bool) -> dict[str, Any]:
    external = bool(settings.ray.address)
    head = None if external else local_ray_head(settings).info()
    address = settings.ray.address or (head.address if head else None)
    out: dict[str, Any] = {
        "mode": "external" if external else "local",
        "address": address,
        "running": address is not None,
        "dashboard_url": head.dashboard_url if head else None,
        "resources": None,
        "nodes": None,
        "serve_applications": None,
    }
    if probe and address is not None:
        out.update(_probe_ray(settings, address))
    return out


def _probe_ray(settings: FramecastSettings, address: str) -> dict[str, Any]:
    import ray
    from ray import serve

    try:
        with ray_connection(settings, address):
            resources = {
                k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")
            }
            nodes = ray_nodes()
            # serve.status() reports no applications when Serve was never started here.
            apps = {
                name: {
                    "status": str(getattr(app.status, "value", app.status)),
                    "deployments": {
                        dep: str(getattr(d.status, "value", d.status))
                        for dep, d in app.deployments.items()
                    },
                }
                for name, app in serve.status().applications.items()
            }
    except (ConnectionError, RuntimeError, ValueError) as error:
        return {"error": f"cannot query Ray at {address}: {error}"}
    return {"resources": resources, "nodes": nodes, "serve_applications": apps}


def ray_nodes() -> list[dict[str, Any]]:
    """The nodes of the connected cluster (``status --json``'s ``ray.nodes``), head first.

    Each: Ray's node id, ``is_head``, ``alive``, its resources (the per-node ``node:<ip>``
    markers left out), Ray's ``node_manager_port``, and framecast's node name when it has one.
    """
    import ray

    out = []
    for node in ray.nodes():
        resources = node.get("Resources") or {}
        out.append(
            {
                "id": node.get("NodeID"),
                "is_head": "node:__internal_head__" in resources,
                "alive": bool(node.get("Alive")),
                "resources": {
                    k: v for k, v in resources.items() if not k.startswith("node:")
                },
                "node_manager_port": node.get("NodeManagerPort"),
                "name": (node.get("Labels") or {}).get(NODE_LABEL),
            }
        )
    out.sort(key=lambda n: (not n["is_head"], not n["alive"], str(n["name"]), str(n["id"])))
    return out
