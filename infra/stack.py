"""The local stack as one unit: start, stop and report on Kafka and PostgreSQL."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import psycopg

from flashsale import kafka_auth
from flashsale.settings import Settings
from flashsale.topics import catalogue
from infra import containers, kafka_acl, migrate, provision
from infra.errors import InfraError
from infra.kafka import KAFKA_VERSION
from infra.kafka_cluster import KafkaCluster, node_dirs, running_nodes, stop_nodes
from infra.postgres import LocalPostgres


@dataclass(frozen=True)
class Endpoints:
    """Where the servers are, whichever way they were started."""

    bootstrap: str
    dsn: str


class Stack:
    """Kafka and PostgreSQL in one of three modes: local processes, containers or external."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        secrets = kafka_auth.secrets_dir(settings) if settings.kafka_auth == "scram" else None
        self.kafka = KafkaCluster.local(
            settings.state_dir, settings.kafka_port, settings.kafka_controller_port,
            settings.kafka_nodes, settings.kafka_heap, secrets=secrets,
        )  # fmt: skip
        self.postgres = LocalPostgres(settings.state_dir, settings.pg_port)

    def endpoints(self) -> Endpoints:
        """Bootstrap servers and DSN for the current mode."""
        if self.settings.infra_mode == "containers":
            found = containers.endpoints(self.settings.state_dir)
            if found:
                return Endpoints(found["bootstrap"], found["dsn"])
        if self.settings.infra_mode == "local":
            return Endpoints(self.kafka.bootstrap, self.postgres.dsn)
        return Endpoints(self.settings.kafka_bootstrap, self.settings.database_url)

    def up(self) -> dict[str, bool]:
        """Start what this mode owns (a no-op when running), then create topics and tables."""
        started = {"kafka": False, "postgres": False}
        mode = self.settings.infra_mode
        if mode == "local":
            self.kafka.refuse_other_layouts()  # before anything starts
            started["postgres"] = self.postgres.start()
            started["kafka"] = self.kafka.start()
        elif mode == "containers":
            containers.start(self.settings.state_dir)
        self.provision()
        return started

    def provision(self) -> list[str]:
        """Topics and migrations; returns the drift found (empty when none)."""
        ep = self.endpoints()
        _, drift = provision.ensure_topics(ep.bootstrap, catalogue(self.settings))
        if self.settings.kafka_auth == "scram":
            kafka_acl.ensure_principals(ep.bootstrap, self.settings)
        migrate.apply(ep.dsn)
        return drift

    def down(self, wipe: bool = False) -> dict[str, bool]:
        """Stop what this mode owns; with wipe, delete the servers' local data too."""
        mode = self.settings.infra_mode
        stopped = {"kafka": False, "postgres": False}
        if mode == "local":
            # whatever FLASHSALE_CLUSTER says now: every node running from this state dir
            stopped["kafka"] = stop_nodes(running_nodes(self.settings.state_dir))
            stopped["postgres"] = self.postgres.stop()
            if wipe:  # the writers' local state is derived from Kafka's: it goes too
                processors = self.settings.state_dir / "processor"
                nodes = node_dirs(self.settings.state_dir)
                for d in (*nodes, self.postgres.home, processors):
                    shutil.rmtree(d, ignore_errors=True)
        elif mode == "containers":
            stopped["kafka"] = stopped["postgres"] = containers.stop(self.settings.state_dir)
        elif wipe:
            raise InfraError(
                "refusing to wipe external servers (KAFKA_BOOTSTRAP_SERVERS/DATABASE_URL)"
            )
        return stopped

    def status(self) -> dict[str, Any]:
        """A JSON-ready report: where each server is and whether it answers."""
        ep = self.endpoints()
        local = self.settings.infra_mode == "local"
        kafka_up = self.kafka.answers() if local else _kafka_answers(ep.bootstrap)
        from infra import supervisor
        from infra.edge import Edge

        return {
            **Edge(self.settings).status(),
            **supervisor.status(self.settings),  # "supervisor" and "services"
            "mode": self.settings.infra_mode,
            "state_dir": str(self.settings.state_dir),
            "kafka": {
                "bootstrap_servers": ep.bootstrap,
                "up": kafka_up,
                "pid": self.kafka.pid() if local else None,
                "nodes": len(self.kafka.nodes) if local else None,
                "version": KAFKA_VERSION if local else None,
            },
            "postgres": {
                "dsn": ep.dsn,
                "up": _postgres_answers(ep.dsn),
                "pid": self.postgres.pid() if local else None,
            },
        }


def _kafka_answers(bootstrap: str) -> bool:
    from flashsale.kafka_auth import AdminClient

    try:
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        return bool(admin.list_topics(timeout=3).brokers)
    except Exception:
        return False


def _postgres_answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False
