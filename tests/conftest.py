"""Shared fixtures: the real servers (started here when not already up) and unique ids."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from flashsale import intent_sig, kafka_auth
from flashsale.settings import Settings
from infra.kafka import LocalKafka
from infra.kafka_cluster import KafkaCluster
from infra.processes import free_port as free_port  # the tests import it from here
from infra.stack import Endpoints, Stack


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def endpoints(settings: Settings) -> Iterator[Endpoints]:
    """Kafka and PostgreSQL for the whole session; stopped after if this session started them."""
    stack = Stack(settings)
    started = stack.up()
    yield stack.endpoints()
    if any(started.values()):
        stack.down()


@pytest.fixture
def uid() -> str:
    """A short unique id so tests can share one broker and one database."""
    return uuid.uuid4().hex[:10]


def local_only(settings: Settings) -> None:
    """Skip tests that kill, wipe or start servers unless the infra is the project's own."""
    if not settings.destructive_tests_allowed:
        pytest.skip("destructive test: runs only with FLASHSALE_INFRA=local")


@pytest.fixture
def private_broker(settings: Settings, uid: str) -> Iterator[LocalKafka]:
    """A Kafka broker of the test's own, for a test that stops it mid-run (the shared one
    serves the others); its data is deleted afterwards."""
    local_only(settings)
    home = settings.state_dir / "test" / f"kafka-{uid}"
    kafka = LocalKafka(home, free_port(), free_port(), "512m", settings.state_dir / "lib")
    kafka.start()
    yield kafka
    kafka.stop()
    shutil.rmtree(home, ignore_errors=True)


def _cluster(settings: Settings, secured: bool) -> Iterator[tuple[KafkaCluster, Settings]]:
    local_only(settings)
    home = settings.state_dir / "test" / f"cluster-{uuid.uuid4().hex[:10]}"
    s = dataclasses.replace(settings, replication_factor=3, kafka_nodes=3)
    if secured:
        s = dataclasses.replace(s, kafka_auth="scram", secrets_override=home / "secrets")
    ports = [(free_port(), free_port()) for _ in range(3)]
    secrets = kafka_auth.secrets_dir(s) if secured else None
    cluster = KafkaCluster.on_ports(home, ports, "512m", settings.state_dir / "lib", secrets)
    try:
        cluster.start()
        if not secured:
            yield cluster, s
        else:
            with operator_of(s):
                yield cluster, s
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def private_cluster(settings: Settings) -> Iterator[KafkaCluster]:
    """Three Kafka nodes of the module's own (RF 3, min.insync 2), for tests that stop nodes;
    its data is deleted afterwards."""
    for cluster, _ in _cluster(settings, secured=False):
        yield cluster


@pytest.fixture(scope="module")
def secured_cluster(settings: Settings) -> Iterator[tuple[KafkaCluster, Settings]]:
    """Like ``private_cluster``, secured as ``make up CLUSTER=3`` is (SASL, ACLs, signed
    intents), with the settings that use it; the module's test process is the operator."""
    yield from _cluster(settings, secured=True)


@contextmanager
def operator_of(s: Settings) -> Iterator[None]:
    """Within the block this test process logs in as the operator of the secured settings
    ``s`` and holds their intent key; its environment is restored afterwards."""
    before = dict(os.environ)
    os.environ.pop(kafka_auth.ENV_USER, None)
    try:
        kafka_auth.log_in(s, "test")
        intent_sig.key.cache_clear()
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)
        kafka_auth.credentials.cache_clear()
        intent_sig.key.cache_clear()


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON lines of the log at ``path`` logging ``event`` (none while it is missing)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = (json.loads(x) for x in lines if x.startswith("{") and f'"{event}"' in x)
    return [r for r in records if r.get("event") == event]
