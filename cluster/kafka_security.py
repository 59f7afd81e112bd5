"""``framecast up --sasl``: the embedded broker behind SASL_SSL, SCRAM users and ACLs.

Everything lives under ``HOME/kafka/sasl`` (mode 0700), made once by ``up --sasl`` and kept:

- ``credentials.json`` (0600): the SCRAM-SHA-512 passwords of ``framecast`` (the user every
  framecast command connects as) and ``intruder`` (a second, ordinary user with rights on
  its own ``intruder*`` resources only, to show what the ACLs refuse), and the keystore
  password. Made with ``secrets.token_urlsafe``; never printed, never on a command line.
- ``ca.pem`` and ``broker.p12`` (0600): a one-off CA (its key is not kept) and the broker's
  key and certificate for 127.0.0.1, valid for a year and remade when under a week is left.

Once the file exists the home is secured for good: a later ``framecast up`` (with or without
``--sasl``) starts the broker the same way, and every CLI command that talks to the embedded
broker connects as ``framecast`` over SASL_SSL (:func:`with_stack_credentials`), unless the
Kafka security settings say otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

if TYPE_CHECKING:
    from cluster.kafka_broker import AclGrant, BrokerSecurity
    from cluster.settings import FramecastSettings
    from streams.config import TopicSettings

APP_USER = "framecast"
INTRUDER_USER = "intruder"
MECHANISM = "SCRAM-SHA-512"
CERT_DAYS = 365
RENEW_DAYS = 7
# The classifier's default consumer group and transactional ids (framecast-<group>-<member>).
GROUP_PREFIX = "framecast"
TRANSACTIONAL_ID_PREFIX = "framecast-"


def sasl_dir(home: Path) -> Path:
    """Where the stack's SASL material lives."""
    return Path(home) / "kafka" / "sasl"


def credentials_file(home: Path) -> Path:
    """The 0600 file with the SCRAM and keystore passwords."""
    return sasl_dir(home) / "credentials.json"


def enabled(home: Path) -> bool:
    """True once ``up --sasl`` has secured this home."""
    return credentials_file(home).is_file()


class StackCredentials:
    """The passwords of a secured home; ``repr`` shows none of them."""

    def __init__(self, users: dict[str, SecretStr], keystore_password: SecretStr) -> None:
        self.users = users
        self.keystore_password = keystore_password

    def __repr__(self) -> str:
        return f"StackCredentials(users={sorted(self.users)})"

    def password(self, user: str) -> SecretStr:
        """The SCRAM password of ``user`` (KeyError when the stack has no such user)."""
        return self.users[user]


def load_credentials(home: Path) -> StackCredentials | None:
    """The credentials of a secured home, None when it is not; ValueError when unreadable."""
    path = credentials_file(home)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the Kafka credentials in {path}: {error}") from None
    try:
        users = {str(name): SecretStr(str(pw)) for name, pw in raw["users"].items()}
        keystore_password = SecretStr(str(raw["keystore_password"]))
    except (KeyError, AttributeError, TypeError):
        raise ValueError(
            f"the Kafka credentials in {path} lack users or keystore_password; "
            "stop the broker (`framecast down`) and delete the file to make new ones"
        ) from None
    if APP_USER not in users:
        raise ValueError(f"the Kafka credentials in {path} have no user {APP_USER!r}")
    return StackCredentials(users, keystore_password)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def ensure_credentials(home: Path) -> StackCredentials:
    """The home's credentials, made (with fresh random passwords) when there are none."""
    existing = load_credentials(home)
    if existing is not None:
        return existing
    directory = sasl_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    raw = {
        "mechanism": MECHANISM,
        "users": {APP_USER: _new_password(), INTRUDER_USER: _new_password()},
        "keystore_password": _new_password(),
    }
    _write_private(credentials_file(home), json.dumps(raw, indent=2) + "\n")
    loaded = load_credentials(home)
    assert loaded is not None  # noqa: S101 - just written
    return loaded


def ensure_tls(home: Path, keystore_password: SecretStr) -> tuple[Path, Path]:
    """(CA PEM, broker keystore) of the home: kept while valid, made when missing or expiring."""
    from cluster.tls import certificate_days_left, make_ca_and_keystore

    directory = sasl_dir(home)
    ca_file, keystore = directory / "ca.pem", directory / "broker.p12"
    if ca_file.is_file() and keystore.is_file():
        try:
            if certificate_days_left(ca_file) > RENEW_DAYS:
                return ca_file, keystore
        except ValueError:
            pass  # unreadable: make new ones
    made = make_ca_and_keystore(
        directory,
        keystore_password.get_secret_value(),
        days=CERT_DAYS,
        ca_name=f"framecast embedded broker CA {secrets.token_hex(4)}",
    )
    return made.ca_file, made.keystore


def stack_grants(topics: TopicSettings) -> tuple[AclGrant, ...]:
    """What each stack user may do.

    ``framecast``: everything on topics named like its four topics (prefixes, so a test's
    ``frames-<tag>`` is covered too), on groups ``framecast*`` and on transactional ids
    ``framecast-*``. ``intruder``: the same on ``intruder*`` only, so that it is a working
    user whose every attempt on framecast's resources is refused by the authorizer.
    """
    from cluster.kafka_broker import AclGrant

    prefixes = sorted({topics.frames, topics.labels, topics.latency, topics.dlq})
    grants = [AclGrant(user=APP_USER, resource="TOPIC", name=p, prefixed=True) for p in prefixes]
    grants += [
        AclGrant(user=APP_USER, resource="GROUP", name=GROUP_PREFIX, prefixed=True),
        AclGrant(
            user=APP_USER, resource="TRANSACTIONAL_ID", name=TRANSACTIONAL_ID_PREFIX, prefixed=True
        ),
    ]
    grants += [
        AclGrant(user=INTRUDER_USER, resource=kind, name=INTRUDER_USER, prefixed=True)
        for kind in ("TOPIC", "GROUP", "TRANSACTIONAL_ID")
    ]
    return tuple(grants)


def broker_security(home: Path, topics: TopicSettings) -> BrokerSecurity:
    """The broker's security for a secured home; makes the credentials and TLS if missing."""
    from cluster.kafka_broker import BrokerSecurity

    credentials = ensure_credentials(home)
    ca_file, keystore = ensure_tls(home, credentials.keystore_password)
    return BrokerSecurity(
        keystore=keystore,
        keystore_password=credentials.keystore_password,
        ca_file=ca_file,
        scram_users=credentials.users,
        authorizer=True,
        acls=stack_grants(topics),
    )


def client_overrides(home: Path, user: str | None = None) -> dict[str, Any] | None:
    """KafkaSettings values that connect to the secured embedded broker as ``user``
    (default ``framecast``); None when the home is not secured."""
    credentials = load_credentials(home)
    if credentials is None:
        return None
    name = user or APP_USER
    return {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": MECHANISM,
        "sasl_username": name,
        "sasl_password": credentials.password(name),
        "ssl_cafile": (sasl_dir(home) / "ca.pem").resolve(),
    }


def with_stack_credentials(settings: FramecastSettings) -> FramecastSettings:
    """``settings`` connecting to a secured embedded broker as ``framecast``.

    Unchanged when Kafka is an external cluster, when the home is not secured, or when the
    Kafka security settings were given (a security_protocol other than PLAINTEXT). A
    ``sasl_username`` given alone picks another stack user (its password from the file);
    a ``sasl_password`` given alone is kept (to try a wrong one, say).
    """
    from cluster.settings import SettingsError

    kafka = settings.kafka
    if not kafka.uses_embedded_broker or kafka.security_protocol != "PLAINTEXT":
        return settings
    try:
        credentials = load_credentials(settings.home)
    except ValueError as error:
        raise SettingsError(f"kafka: {error}") from None
    if credentials is None:
        return settings
    user = kafka.sasl_username or APP_USER
    if kafka.sasl_password is None and user not in credentials.users:
        raise SettingsError(
            f"kafka.sasl_username: the embedded broker has no user {user!r} "
            f"(it has {', '.join(sorted(credentials.users))}); give its sasl_password too"
        )
    update: dict[str, Any] = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": kafka.sasl_mechanism or MECHANISM,
        "sasl_username": user,
        "sasl_password": kafka.sasl_password or credentials.password(user),
        "ssl_cafile": kafka.ssl_cafile or (sasl_dir(settings.home) / "ca.pem").resolve(),
    }
    return settings.model_copy(update={"kafka": kafka.model_copy(update=update)})
