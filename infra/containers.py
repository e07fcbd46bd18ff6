"""Opt-in: Kafka and PostgreSQL in containers via testcontainers (needs a Docker engine).

The containers outlive this process (Ryuk is disabled) so that `make up` can leave them
running; their ids are kept in the state directory and `down` removes them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from infra.errors import InfraError

KAFKA_IMAGE = "apache/kafka:4.1.1"
POSTGRES_IMAGE = "postgres:15"


def _state(state_dir: Path) -> Path:
    return state_dir / "containers.json"


def start(state_dir: Path) -> dict[str, str]:
    """Start both containers unless recorded ones run; return bootstrap and dsn."""
    recorded = _state(state_dir)
    if recorded.exists():
        return dict(json.loads(recorded.read_text())["endpoints"])
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    try:
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer

        kafka = KafkaContainer(KAFKA_IMAGE).with_kraft()
        kafka.start()
        pg = PostgresContainer(
            POSTGRES_IMAGE, username="flashsale", password="flashsale", dbname="flashsale"
        )
        pg.start()
    except Exception as exc:  # docker not reachable, image pull refused, ...
        raise InfraError(
            f"FLASHSALE_INFRA=containers needs a reachable Docker engine: {exc}"
        ) from None
    endpoints = {
        "bootstrap": kafka.get_bootstrap_server(),
        "dsn": pg.get_connection_url(driver=None),
    }
    ids = [kafka.get_wrapped_container().id, pg.get_wrapped_container().id]
    state_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps({"endpoints": endpoints, "containers": ids}))
    return endpoints


def endpoints(state_dir: Path) -> dict[str, str] | None:
    """Recorded endpoints of running containers, if any."""
    recorded = _state(state_dir)
    return dict(json.loads(recorded.read_text())["endpoints"]) if recorded.exists() else None


def stop(state_dir: Path) -> bool:
    """Remove the recorded containers. True if there were any."""
    recorded = _state(state_dir)
    if not recorded.exists():
        return False
    import docker

    client = docker.from_env()
    for cid in json.loads(recorded.read_text())["containers"]:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(cid).remove(force=True)
    recorded.unlink()
    return True
