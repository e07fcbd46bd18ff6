"""Start/stop behaviour of the project's own servers, on private ports and state dirs.

These never touch the session's shared servers: each test runs its own broker or cluster.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flashsale.settings import Settings
from infra import processes
from infra.errors import CorruptState, MissingBinary, PortInUse
from infra.kafka import LocalKafka
from infra.postgres import LocalPostgres
from tests.conftest import free_port, local_only

pytestmark = pytest.mark.slow


@pytest.fixture
def kafka(settings: Settings, tmp_path: Path) -> Iterator[LocalKafka]:
    local_only(settings)
    broker = LocalKafka(tmp_path, free_port(), free_port(), "512m", settings.state_dir / "lib")
    yield broker
    broker.stop()


@pytest.fixture
def postgres(settings: Settings, uid: str) -> Iterator[LocalPostgres]:
    local_only(settings)
    # Under the project's state dir: as root, the postgres user cannot enter pytest's tmp dirs.
    home = settings.state_dir / "test" / uid
    home.mkdir(parents=True)
    cluster = LocalPostgres(home, free_port())
    yield cluster
    cluster.stop()
    shutil.rmtree(home, ignore_errors=True)


def test_kafka_up_twice_down_twice_and_after_unclean_kill(kafka: LocalKafka):
    assert kafka.start() is True
    first = kafka.pid()
    assert kafka.start() is False, "a second up must be a no-op"
    assert kafka.pid() == first

    os.killpg(first or 0, signal.SIGKILL)  # unclean: no shutdown hooks run
    assert processes.wait_until(lambda: kafka.pid() is None, 10)
    assert kafka.start() is True, "up after a kill starts a new broker"
    assert kafka.answers()
    second = kafka.pid()
    assert second not in (None, first)

    assert kafka.stop() is True
    assert kafka.stop() is False
    assert second is not None and not processes.alive(second), "no broker process left behind"


def test_postgres_up_twice_down_twice_and_after_unclean_kill(postgres: LocalPostgres):
    assert postgres.start() is True
    assert postgres.start() is False
    first = postgres.pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert processes.wait_until(lambda: not processes.alive(first), 10)
    assert postgres.start() is True
    assert postgres.answers()
    assert postgres.stop() is True
    assert postgres.stop() is False
    assert postgres.pid() is None


def test_port_in_use_names_the_port_and_the_fix(kafka: LocalKafka):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", kafka.port))
        squatter.listen()
        with pytest.raises(PortInUse) as err:
            kafka.start()
    message = str(err.value)
    assert str(kafka.port) in message and "FLASHSALE_KAFKA_PORT" in message
    assert kafka.pid() is None


def test_cli_reports_port_in_use_with_exit_code_2(settings: Settings, uid: str):
    local_only(settings)
    tmp_path = settings.state_dir / "test" / uid
    port = free_port()
    env = {
        **os.environ,
        "FLASHSALE_STATE_DIR": str(tmp_path),
        "FLASHSALE_PG_PORT": str(port),
        "FLASHSALE_KAFKA_PORT": str(free_port()),
        "FLASHSALE_KAFKA_CONTROLLER_PORT": str(free_port()),
    }
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        done = subprocess.run(
            [sys.executable, "-m", "flashsale.cli", "infra", "up"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"port {port} (for PostgreSQL) is already in use" in done.stderr
    assert "FLASHSALE_PG_PORT" in done.stderr


def test_missing_java_names_the_install_command(kafka: LocalKafka, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingBinary, match="apt-get install -y openjdk-17-jre-headless"):
        kafka._java()


def test_missing_postgres_binaries_name_the_install_command(
    postgres: LocalPostgres, tmp_path: Path, monkeypatch
):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("FLASHSALE_PG_BINDIR", str(empty))
    with pytest.raises(MissingBinary, match=r"pg_ctl.*apt-get install -y postgresql"):
        postgres.start()


def test_corrupted_kafka_state_is_named(kafka: LocalKafka):
    data = kafka.home / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_bytes(b"\x00\xffgarbage")
    with pytest.raises(CorruptState, match="make clean"):
        kafka.start()


def test_corrupted_postgres_state_is_named(postgres: LocalPostgres):
    postgres.data.mkdir(parents=True)
    (postgres.data / "base").mkdir()
    with pytest.raises(CorruptState, match="PG_VERSION"):
        postgres.start()


def test_an_edge_that_fails_to_start_stops_the_servers_it_started(
    settings: Settings, endpoints: Any, uid: str, tmp_path: Path
):
    from infra.edge import Edge

    ports = [free_port(), free_port()]
    edge_settings = dataclasses.replace(
        settings, state_dir=tmp_path, namespace=f"t-edge-{uid}", http_port=free_port()
    )
    edge = Edge(edge_settings, server_ports=ports)
    with socket.socket() as taken:  # the second app server's port is in use
        taken.bind(("127.0.0.1", ports[1]))
        taken.listen()
        with pytest.raises(PortInUse):
            edge.up()
        first = edge.servers[0]
        assert first.pidfile.exists() is False and first.pid() is None
        assert processes.wait_until(lambda: processes.port_is_free(ports[0]), 10, 0.1)
    assert edge.nginx.pid() is None
