"""Kafka clients on librdkafka (confluent-kafka): the admin facade framecast uses, and
the callbacks that turn librdkafka's errors into clear ones.

:func:`admin_client` opens a :class:`KafkaAdmin` (``confluent_kafka.admin.AdminClient``
underneath) and proves the connection before it hands it over: an unreachable cluster or
refused credentials raise :class:`KafkaConnectionError` at once, naming the bootstrap
servers, the security protocol and, for refused credentials, the user (never a secret).
librdkafka reports why a connection failed through its error callback
(``KafkaError._AUTHENTICATION``, ``_SSL``, ``_TRANSPORT``); a refused request carries its
Kafka error code (``TOPIC_AUTHORIZATION_FAILED``, ...) in :class:`KafkaAdminError`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from streams.config import KafkaSettings, redact_secrets
from streams.exceptions import KafkaAdminError, KafkaConnectionError

if TYPE_CHECKING:
    from streams.topics import TopicSpec

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# What librdkafka's error callback reports about a connection that never worked.
_REFUSED_LOGIN = KafkaError._AUTHENTICATION
_REFUSED_TLS = KafkaError._SSL


def rdkafka_reason(error: BaseException) -> str:
    """What a confluent-kafka (librdkafka) exception says, in one line."""
    inner = error.args[0] if error.args else None
    if isinstance(inner, KafkaError):
        return f"{inner.name()}: {inner.str()}"
    return str(error)


def rdkafka_callbacks(logger: logging.Logger) -> dict[str, Any]:
    """librdkafka client properties that route its log lines and its background errors
    (a broker down, refused credentials) to ``logger`` instead of stderr, secrets masked.

    librdkafka retries transient errors by itself; they are warnings, fatal ones errors.
    """

    def on_error(error: KafkaError) -> None:
        level = logging.ERROR if error.fatal() else logging.WARNING
        logger.log(level, "kafka: %s: %s", error.name(), error.str())

    return {"error_cb": on_error, "logger": redact_secrets(logger)}


@dataclass(frozen=True)
class PartitionInfo:
    """One partition as the cluster's metadata has it (broker ids; leader -1 = none)."""

    partition: int
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]


@dataclass(frozen=True)
class GroupInfo:
    """A consumer group's state (``stable``, ``empty``, ``dead``, ...) and member ids."""

    state: str
    members: tuple[str, ...]

    @property
    def stable(self) -> bool:
        """True once the group has finished rebalancing."""
        return self.state == "stable"


class _DebugLog(logging.LoggerAdapter[logging.Logger]):
    """librdkafka's own log lines of an admin client, at DEBUG (``framecast -v``).

    While the connection is proved they are expected retries; whatever ends a call is
    raised as an error that says it, once.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        self.logger.log(logging.DEBUG, msg, *args, **kwargs)


class KafkaAdmin:
    """The admin operations framecast needs, over ``confluent_kafka.admin.AdminClient``.

    Every call waits for its answer (at most the settings' request timeout) and raises
    :class:`KafkaConnectionError` when the cluster stops answering or :class:`KafkaAdminError`
    (with the Kafka error code) when it refuses the request.
    """

    def __init__(self, settings: KafkaSettings, bootstrap_servers: str | None = None) -> None:
        config = settings.rdkafka_config(bootstrap_servers)
        self.where = f"{config['bootstrap.servers']} ({settings.security_protocol})"
        self.user = settings.sasl_username
        self.timeout_s = settings.request_timeout_ms / 1000
        self._settings = settings
        self._errors: list[KafkaError] = []

        def on_error(error: KafkaError) -> None:
            log.debug("kafka admin: %s: %s", error.name(), error.str())
            self._errors.append(error)

        config.update(error_cb=on_error, logger=_DebugLog(redact_secrets(log), {}))
        self._client = AdminClient(config)

    # -- the connection ------------------------------------------------------------------
    def connect(self) -> None:
        """Prove that the cluster answers and accepts our credentials, or raise
        KafkaConnectionError saying which (within the request timeout)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self._client.list_topics(timeout=min(0.5, max(0.05, deadline - time.monotonic())))
                return
            except KafkaException:
                pass
            self._client.poll(0)  # serves the error callback: why it failed, if librdkafka knows
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            if time.monotonic() >= deadline:
                raise KafkaConnectionError(
                    f"cannot reach Kafka at {self.where}: no broker answered within "
                    f"{self.timeout_s:g}s; is it running (`framecast up`) and are "
                    "--bootstrap-servers and the security settings right?"
                    + self._last_error()
                )

    def _refusal(self) -> KafkaConnectionError | None:
        codes = {error.code(): error for error in self._errors}
        if _REFUSED_LOGIN in codes:
            return self._authentication_error(codes[_REFUSED_LOGIN])
        if _REFUSED_TLS in codes:
            return KafkaConnectionError(
                f"Kafka at {self.where} failed the TLS handshake ({codes[_REFUSED_TLS].str()}): "
                "check ssl_cafile (FRAMECAST_KAFKA_SSL_CAFILE), the client certificate and "
                "ssl_check_hostname"
            )
        return None

    def _authentication_error(self, error: KafkaError) -> KafkaConnectionError:
        """Who was refused, by what mechanism, and why; never a secret."""
        mechanism = self._settings.sasl_mechanism or self._settings.security_protocol
        return KafkaConnectionError(
            f"Kafka at {self.where} refused the SASL authentication of user "
            f"{self.user or '(no user)'!r} ({mechanism}; {error.str()}): check sasl_username "
            "and sasl_password (FRAMECAST_KAFKA_SASL_USERNAME / FRAMECAST_KAFKA_SASL_PASSWORD) "
            "and sasl_mechanism"
        )

    def _last_error(self) -> str:
        return f" (last error: {self._errors[-1].str()})" if self._errors else ""

    def close(self) -> None:
        """Serve pending callbacks; librdkafka frees the client when it is collected."""
        with contextlib.suppress(KafkaException, RuntimeError):
            self._client.poll(0)

    # -- topics --------------------------------------------------------------------------
    def topic_names(self, *, internal: bool = False) -> set[str]:
        """Names of the topics we may see (``__consumer_offsets`` and co. only if asked)."""
        topics = self._call("list topics", lambda: self._client.list_topics(
            timeout=self.timeout_s).topics)
        return {name for name in topics if internal or not name.startswith("__")}

    def describe_partitions(self, names: Iterable[str]) -> dict[str, list[PartitionInfo]]:
        """Leader, replicas and in-sync replicas of every partition of the named topics."""
        wanted = list(names)
        topics = self._call("describe topics", lambda: self._client.list_topics(
            timeout=self.timeout_s).topics)
        out: dict[str, list[PartitionInfo]] = {}
        for name in wanted:
            metadata = topics.get(name)
            if metadata is None:
                raise KafkaAdminError(
                    f"cannot describe topic {name!r} at {self.where}: no such topic",
                    code="UNKNOWN_TOPIC_OR_PART",
                )
            if metadata.error is not None:
                raise KafkaAdminError(
                    f"cannot describe topic {name!r} at {self.where}: {metadata.error.str()}",
                    code=metadata.error.name(),
                )
            out[name] = [
                PartitionInfo(p.id, p.leader, tuple(p.replicas), tuple(p.isrs))
                for p in sorted(metadata.partitions.values(), key=lambda p: p.id)
            ]
        return out

    def create_topics(self, specs: Iterable[TopicSpec]) -> None:
        """Create the topics of specs and wait until the cluster's metadata shows each with
        a leader for every partition (a producer or consumer started next finds them)."""
        specs = list(specs)
        if not specs:
            return
        futures = self._client.create_topics(
            [
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=spec.replication_factor,
                    config=dict(spec.config),
                )
                for spec in specs
            ],
            operation_timeout=self.timeout_s,
            request_timeout=self.timeout_s,
        )
        for name, future in futures.items():
            self._result(f"create topic {name!r}", future)
        self._wait_for_leaders({spec.name: spec.partitions for spec in specs})

    def _wait_for_leaders(self, partitions: dict[str, int]) -> None:
        limit_s = max(30.0, self.timeout_s)
        deadline = time.monotonic() + limit_s
        while True:
            topics = self._call("list topics", lambda: self._client.list_topics(
                timeout=self.timeout_s).topics)
            pending = [
                name
                for name, count in partitions.items()
                if name not in topics
                or len(topics[name].partitions) < count
                or any(p.leader < 0 for p in topics[name].partitions.values())
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise KafkaAdminError(
                    f"topics {pending} at {self.where} have no leader for every partition "
                    f"after {limit_s:.0f}s",
                    code="LEADER_NOT_AVAILABLE",
                )
            time.sleep(0.1)

    def delete_topics(self, names: Iterable[str], *, missing_ok: bool = True) -> None:
        """Delete the named topics (those that do not exist are skipped with missing_ok)."""
        names = list(names)
        if not names:
            return
        futures = self._client.delete_topics(
            names, operation_timeout=self.timeout_s, request_timeout=self.timeout_s
        )
        for name, future in futures.items():
            try:
                self._result(f"delete topic {name!r}", future)
            except KafkaAdminError as error:
                if not (missing_ok and error.code == "UNKNOWN_TOPIC_OR_PART"):
                    raise

    def add_partitions(self, name: str, total: int) -> None:
        """Grow topic ``name`` to ``total`` partitions (Kafka cannot shrink one)."""
        futures = self._client.create_partitions(
            [NewPartitions(name, total)],
            operation_timeout=self.timeout_s,
            request_timeout=self.timeout_s,
        )
        for future in futures.values():
            self._result(f"add partitions to topic {name!r}", future)
        self._wait_for_leaders({name: total})

    def topic_configs(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        """The configs set on each named topic itself (not the broker's defaults)."""
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
        if not resources:
            return {}
        futures = self._client.describe_configs(resources, request_timeout=self.timeout_s)
        out: dict[str, dict[str, str]] = {}
        for resource, future in futures.items():
            entries: dict[str, ConfigEntry] = self._result(
                f"describe the configs of topic {resource.name!r}", future
            )
            out[resource.name] = {
                key: entry.value
                for key, entry in entries.items()
                if _source(entry) == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
                and entry.value is not None
            }
        return out

    def alter_topic_configs(self, name: str, configs: dict[str, str]) -> None:
        """Set these configs on topic ``name``, leaving its other configs as they are."""
        resource = ConfigResource(
            ResourceType.TOPIC,
            name,
            incremental_configs=[
                ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
                for key, value in configs.items()
            ],
        )
        futures = self._client.incremental_alter_configs(
            [resource], request_timeout=self.timeout_s
        )
        for future in futures.values():
            self._result(f"alter the configs of topic {name!r}", future)
        # The controller has the change; a broker answers with it once its metadata has
        # caught up (KRaft), so wait for that and a describe right after sees it.
        limit_s = max(30.0, self.timeout_s)
        deadline = time.monotonic() + limit_s
        while True:
            shown = self.topic_configs([name]).get(name, {})
            if all(shown.get(key) == value for key, value in configs.items()):
                return
            if time.monotonic() > deadline:
                raise KafkaAdminError(
                    f"topic {name!r} at {self.where} does not show its new configs "
                    f"{sorted(configs)} after {limit_s:.0f}s",
                    code="REQUEST_TIMED_OUT",
                )
            time.sleep(0.1)

    # -- consumer groups -----------------------------------------------------------------
    def committed_offsets(self, group: str) -> dict[tuple[str, int], int]:
        """{(topic, partition): offset} that ``group`` has committed (empty: none)."""
        futures = self._client.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=self.timeout_s
        )
        result = self._result(f"list the offsets of group {group!r}", futures[group])
        return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions or []}

    def describe_group(self, group: str) -> GroupInfo:
        """The group's state and members (``dead`` and none when it does not exist)."""
        futures = self._client.describe_consumer_groups([group], request_timeout=self.timeout_s)
        description = self._result(f"describe group {group!r}", futures[group])
        state = getattr(description.state, "name", str(description.state)).lower()
        return GroupInfo(state, tuple(member.member_id for member in description.members))

    # -- errors --------------------------------------------------------------------------
    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except KafkaException as error:
            raise self._error(what, error) from None

    def _result(self, what: str, future: Future[Any]) -> Any:
        try:
            return future.result(timeout=self.timeout_s + 5)
        except KafkaException as error:
            raise self._error(what, error) from None
        except TimeoutError:
            raise KafkaConnectionError(
                f"Kafka at {self.where} did not answer to {what} within {self.timeout_s:g}s"
                + self._last_error()
            ) from None

    def _error(self, what: str, error: KafkaException) -> KafkaConnectionError | KafkaAdminError:
        self._client.poll(0)
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        inner = error.args[0] if error.args else None
        if not isinstance(inner, KafkaError):
            return KafkaAdminError(f"cannot {what} at {self.where}: {error}", code="UNKNOWN")
        if inner.code() in (
            KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN
        ):
            return KafkaConnectionError(
                f"cannot {what}: Kafka at {self.where} does not answer ({inner.str()})"
            )
        return KafkaAdminError(
            f"Kafka at {self.where} refused to {what}: {inner.name()}: {inner.str()}",
            code=inner.name(),
        )


def _source(entry: ConfigEntry) -> int:
    source = entry.source  # an int from the C extension, despite its annotation
    return source.value if isinstance(source, ConfigSource) else int(source)


@contextlib.contextmanager
def admin_client(
    settings: KafkaSettings, bootstrap_servers: str | None = None
) -> Iterator[KafkaAdmin]:
    """A :class:`KafkaAdmin` for the configured cluster, connected (or KafkaConnectionError)
    and closed on exit."""
    admin = KafkaAdmin(settings, bootstrap_servers)
    try:
        admin.connect()
        yield admin
    finally:
        admin.close()


def group_free_consumer(
    settings: KafkaSettings,
    bootstrap_servers: str | None,
    logger: logging.Logger,
    **properties: Any,
) -> Consumer:
    """A consumer that never joins a group and commits nothing (it reads what it is
    assigned, or asks for offsets); ``properties`` are further librdkafka properties."""
    return Consumer(
        {
            **settings.rdkafka_config(bootstrap_servers),
            **rdkafka_callbacks(logger),
            "group.id": f"{settings.client_id}-reader",  # librdkafka wants one; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            **properties,
        }
    )


def topic_reader(
    settings: KafkaSettings, bootstrap_servers: str | None, topic: str, logger: logging.Logger
) -> Consumer:
    """A consumer of every partition of ``topic`` from its first offset, outside any group:
    for readers of a whole topic, such as the demo and the benchmarks. It reads committed
    records only (librdkafka's read_committed)."""
    consumer = group_free_consumer(settings, bootstrap_servers, logger)
    timeout_s = settings.request_timeout_ms / 1000
    deadline = time.monotonic() + timeout_s
    while True:  # a topic just created may be unknown to a broker for a moment
        try:
            metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        except KafkaException as error:
            consumer.close()
            raise KafkaConnectionError(
                f"cannot read topic {topic!r}: {rdkafka_reason(error)}"
            ) from None
        if metadata is not None and metadata.error is None and metadata.partitions:
            break
        if time.monotonic() > deadline:
            consumer.close()
            raise KafkaAdminError(
                f"cannot read topic {topic!r} after {timeout_s:g}s: "
                f"{metadata.error.str() if metadata and metadata.error else 'no such topic'}",
                code="UNKNOWN_TOPIC_OR_PART",
            )
        time.sleep(0.2)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
    return consumer
