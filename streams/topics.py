"""Declarative topic specs: what topics framecast needs, and applying them to a cluster.

A spec file is YAML::

    topics:
      - name: frames
        partitions: 8
        replication_factor: 1
        config: {retention.ms: "86400000", max.message.bytes: "8388608"}

Applying a spec creates missing topics, adds partitions where the spec asks for more, and
sets the listed configs; it never deletes a topic or shrinks one (Kafka cannot).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from streams.client import KafkaAdmin
from streams.config import TopicSettings
from streams.exceptions import KafkaAdminError, TopicSpecError

_TOPIC_NAME = r"^[A-Za-z0-9._-]{1,249}$"


class TopicSpec(BaseModel):
    """One topic as framecast wants it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_TOPIC_NAME, description="Topic name.")
    partitions: PositiveInt = Field(default=1, description="Number of partitions.")
    replication_factor: PositiveInt = Field(default=1, description="Replicas per partition.")
    config: dict[str, str] = Field(default_factory=dict, description="Topic-level configs.")

    @field_validator("config", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value


class TopicsFile(BaseModel):
    """The top level of a topic spec file."""

    model_config = ConfigDict(extra="forbid")

    topics: list[TopicSpec] = Field(min_length=1)


class TopicChange(BaseModel):
    """What applying a spec did to one topic."""

    name: str
    action: Literal["created", "updated", "unchanged"]
    details: list[str] = Field(default_factory=list)


def default_topic_specs(settings: TopicSettings) -> list[TopicSpec]:
    """The four topics of DESIGN (frames, labels, latency, DLQ) with the configured defaults."""
    base = {"retention.ms": str(settings.retention_ms)}
    big = {**base, "max.message.bytes": str(settings.max_message_bytes)}
    common = {"partitions": settings.partitions, "replication_factor": settings.replication_factor}
    return [
        TopicSpec(name=settings.frames, config=big, **common),
        TopicSpec(name=settings.labels, config=base, **common),
        TopicSpec(
            name=settings.latency,
            partitions=1,
            replication_factor=settings.replication_factor,
            config=base,
        ),
        TopicSpec(name=settings.dlq, config=big, **common),
    ]


def run_topics(base: TopicSettings, prefix: str, partitions: int | None = None) -> TopicSettings:
    """Topic settings for one run on topics of its own (``PREFIX.TAG.frames``, ...): the
    demo's and the benchmarks' runs, which delete them afterwards."""
    tag = uuid.uuid4().hex[:8]
    kinds = ("frames", "labels", "latency", "dlq")
    update: dict[str, Any] = {kind: f"{prefix}.{tag}.{kind}" for kind in kinds}
    if partitions is not None:
        update["partitions"] = partitions
    return base.model_copy(update=update)


def topic_names(topics: TopicSettings) -> dict[str, str]:
    """{kind: name} of the four topics."""
    return {kind: getattr(topics, kind) for kind in ("frames", "labels", "latency", "dlq")}


def load_topic_specs(path: Path) -> list[TopicSpec]:
    """Read and validate a YAML spec file; raise TopicSpecError naming the bad field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise TopicSpecError(f"cannot read topic spec {path}: {error}") from None
    try:
        specs = TopicsFile.model_validate(raw).topics
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise TopicSpecError(f"invalid topic spec {path}: {problems}") from None
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TopicSpecError(f"invalid topic spec {path}: duplicate topics {duplicates}")
    return specs


def describe_topics(admin: KafkaAdmin, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Partitions, replication and the configs set on the named (or all user) topics."""
    existing = sorted(admin.topic_names())
    wanted = existing if names is None else names
    missing = sorted(set(wanted) - set(existing))
    if missing:
        raise TopicSpecError(f"no such topic(s): {', '.join(missing)}")
    if not wanted:
        return []
    partitions = admin.describe_partitions(wanted)
    configs = admin.topic_configs(wanted)
    return [
        {
            "name": name,
            "partitions": len(partitions[name]),
            "replication_factor": len(partitions[name][0].replicas) if partitions[name] else 0,
            "config": configs.get(name, {}),
        }
        for name in wanted
    ]


def apply_topic_specs(admin: KafkaAdmin, specs: list[TopicSpec]) -> list[TopicChange]:
    """Make the cluster match specs (create, grow, reconfigure); returns what changed."""
    existing = admin.topic_names(internal=True)
    changes: list[TopicChange] = []
    to_create = [spec for spec in specs if spec.name not in existing]
    if to_create:
        try:
            admin.create_topics(to_create)
        except KafkaAdminError as error:
            raise TopicSpecError(
                f"creating topics {[s.name for s in to_create]} failed: {error}"
            ) from None
        changes += [
            TopicChange(
                name=spec.name,
                action="created",
                details=[
                    f"partitions={spec.partitions}",
                    f"replication_factor={spec.replication_factor}",
                ],
            )
            for spec in to_create
        ]
    present = [spec for spec in specs if spec.name in existing]
    if present:
        current = {t["name"]: t for t in describe_topics(admin, [s.name for s in present])}
        for spec in present:
            changes.append(_reconcile(admin, spec, current[spec.name]))
    order = {spec.name: i for i, spec in enumerate(specs)}
    return sorted(changes, key=lambda change: order[change.name])


def _reconcile(admin: KafkaAdmin, spec: TopicSpec, current: dict[str, Any]) -> TopicChange:
    details: list[str] = []
    if spec.partitions < current["partitions"]:
        raise TopicSpecError(
            f"topic {spec.name} has {current['partitions']} partitions and the spec asks for "
            f"{spec.partitions}: Kafka cannot remove partitions"
        )
    if spec.replication_factor != current["replication_factor"]:
        raise TopicSpecError(
            f"topic {spec.name} has replication factor {current['replication_factor']} and the "
            f"spec asks for {spec.replication_factor}: reassign replicas with Kafka's tools"
        )
    try:
        if spec.partitions > current["partitions"]:
            admin.add_partitions(spec.name, spec.partitions)
            details.append(f"partitions {current['partitions']} -> {spec.partitions}")
        diff = {k: v for k, v in spec.config.items() if current["config"].get(k) != v}
        if diff:
            admin.alter_topic_configs(spec.name, diff)
            details += [f"{k}={v}" for k, v in sorted(diff.items())]
    except KafkaAdminError as error:
        raise TopicSpecError(f"updating topic {spec.name} failed: {error}") from None
    return TopicChange(
        name=spec.name, action="updated" if details else "unchanged", details=details
    )


def ensure_topics(admin: KafkaAdmin, specs: list[TopicSpec]) -> list[str]:
    """Create the topics of specs that do not exist yet; existing ones are left as they are."""
    existing = admin.topic_names(internal=True)
    missing = [spec for spec in specs if spec.name not in existing]
    if missing:
        apply_topic_specs(admin, missing)
    return [spec.name for spec in missing]
