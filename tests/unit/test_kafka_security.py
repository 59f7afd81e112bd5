"""The files and settings of `framecast up --sasl` (no broker: see
tests/reliability/test_sasl_acls.py for the broker refusing and admitting)."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from cluster import stack
from cluster.exceptions import BrokerStartError
from cluster.kafka_broker import AclGrant, BrokerSecurity
from cluster.kafka_security import (
    APP_USER,
    INTRUDER_USER,
    broker_security,
    credentials_file,
    ensure_credentials,
    load_credentials,
    sasl_dir,
    stack_grants,
    with_stack_credentials,
)
from cluster.settings import SettingsError, load_settings
from cluster.tls import certificate_days_left
from streams.config import TopicSettings


@pytest.fixture(autouse=True)
def _no_framecast_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FRAMECAST_"):
            monkeypatch.delenv(name)


def test_credentials_are_random_private_and_made_once(tmp_path: Path) -> None:
    made = ensure_credentials(tmp_path)
    again = ensure_credentials(tmp_path)
    assert set(made.users) == {APP_USER, INTRUDER_USER}
    passwords = [p.get_secret_value() for p in made.users.values()]
    passwords.append(made.keystore_password.get_secret_value())
    assert len(set(passwords)) == 3 and all(len(p) >= 32 for p in passwords)
    assert [p.get_secret_value() for p in again.users.values()] == passwords[:2]
    assert stat.S_IMODE(credentials_file(tmp_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(sasl_dir(tmp_path).stat().st_mode) == 0o700
    for secret in passwords:
        assert secret not in repr(made)


def test_broker_security_makes_a_year_of_tls_and_the_stack_acls(tmp_path: Path) -> None:
    security = broker_security(tmp_path, TopicSettings())
    assert security.authorizer and security.acls == stack_grants(TopicSettings())
    assert 360 < certificate_days_left(security.ca_file) <= 365
    assert stat.S_IMODE(security.keystore.stat().st_mode) == 0o600
    password = security.keystore_password.get_secret_value()
    assert password not in repr(security)
    # Kept while valid: a second start reuses the same CA (clients keep trusting it).
    before = security.ca_file.read_bytes()
    assert broker_security(tmp_path, TopicSettings()).ca_file.read_bytes() == before


def test_grants_give_framecast_its_topics_group_and_ids_and_intruder_only_its_own() -> None:
    grants = stack_grants(TopicSettings())
    mine = {(g.resource, g.name) for g in grants if g.user == APP_USER}
    assert mine == {
        ("TOPIC", "frames"),
        ("TOPIC", "frames.dlq"),
        ("TOPIC", "labels"),
        ("TOPIC", "latency"),
        ("GROUP", "framecast"),
        ("TRANSACTIONAL_ID", "framecast-"),
    }
    theirs = {g.name for g in grants if g.user == INTRUDER_USER}
    assert theirs == {INTRUDER_USER}
    assert all(g.prefixed for g in grants)


def test_acls_without_the_authorizer_are_refused(tmp_path: Path) -> None:
    security = broker_security(tmp_path, TopicSettings())
    with pytest.raises(ValidationError, match="authorizer"):
        BrokerSecurity(
            keystore=security.keystore,
            keystore_password=SecretStr("x"),
            ca_file=security.ca_file,
            acls=(AclGrant(user="u", resource="TOPIC", name="t"),),
        )


def test_settings_connect_as_framecast_once_the_home_is_secured(tmp_path: Path) -> None:
    plain = load_settings(home=tmp_path)
    assert with_stack_credentials(plain) is plain  # not secured: unchanged
    credentials = ensure_credentials(tmp_path)
    kafka = with_stack_credentials(load_settings(home=tmp_path)).kafka
    assert kafka.security_protocol == "SASL_SSL" and kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert kafka.sasl_username == APP_USER
    assert kafka.sasl_password == credentials.password(APP_USER)
    assert kafka.ssl_cafile == (sasl_dir(tmp_path) / "ca.pem").resolve()
    # Another stack user by name; a password given alone is kept (a wrong one, say).
    other = load_settings(home=tmp_path, kafka={"sasl_username": INTRUDER_USER})
    assert with_stack_credentials(other).kafka.sasl_password == credentials.password(
        INTRUDER_USER
    )
    wrong = load_settings(home=tmp_path, kafka={"sasl_password": "nope"})
    assert with_stack_credentials(wrong).kafka.sasl_password == SecretStr("nope")
    with pytest.raises(SettingsError, match=r"kafka\.sasl_username"):
        with_stack_credentials(load_settings(home=tmp_path, kafka={"sasl_username": "nobody"}))
    # An external cluster, or security settings given: left alone.
    external = load_settings(home=tmp_path, kafka={"bootstrap_servers": "kafka:9092"})
    assert with_stack_credentials(external) is external
    explicit = load_settings(home=tmp_path, kafka={"security_protocol": "SSL"})
    assert with_stack_credentials(explicit) is explicit
    assert credentials.password(APP_USER).get_secret_value() not in json.dumps(
        with_stack_credentials(plain).redacted()
    )


def test_a_damaged_credentials_file_fails_naming_it(tmp_path: Path) -> None:
    ensure_credentials(tmp_path)
    credentials_file(tmp_path).write_text('{"users": 3}')
    with pytest.raises(SettingsError, match="credentials"):
        with_stack_credentials(load_settings(home=tmp_path))
    credentials_file(tmp_path).write_text("not json")
    with pytest.raises(ValueError, match=re.escape(str(credentials_file(tmp_path)))):
        load_credentials(tmp_path)


def test_sasl_with_an_external_cluster_is_refused_before_anything_starts(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, kafka={"bootstrap_servers": "127.0.0.1:1"})
    with pytest.raises(BrokerStartError, match="external cluster"):
        stack.up(settings, ray=False, sasl=True)
    assert not sasl_dir(tmp_path).exists()
