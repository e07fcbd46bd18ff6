"""The outcomes projection: the decisions topic's facts from Kafka into PostgreSQL.

It runs on the shared ``ProjectionRunner`` (projections/runner.py): PostgreSQL, not Kafka,
holds its position; each batch's rows and tracking offsets commit in one transaction.
Rows come from ``projections.rows``, the SQL from ``projections.store``.

Run one: ``python -m projections.postgres [--group G] [--projection P] [--only-sale S]...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence

import psycopg
import structlog

from flashsale import logs
from flashsale.service_metrics import ServiceMetrics
from flashsale.settings import Settings
from flashsale.topics import DEAD_LETTERS, DECISIONS, SKU_COMMANDS, TopicNames
from infra.signals import stop_on_signals
from projections import store
from projections.rows import BatchRows
from projections.runner import (
    Decoded,
    ProjectionError,
    ProjectionRunner,
    use_short_switch_interval,
)
from projections.store import reset
from schemas.codec import SchemaRegistry, default_registry

__all__ = ["OutcomesProjection", "PostgresProjector", "ProjectionError", "main", "reset"]

log = structlog.get_logger(__name__)

DEFAULT_NAME = "postgres-projector"
DEFAULT_GROUP = "flashsale-projector"


class OutcomesProjection:
    """Sales, intent outcomes (and so the orders view) and counters: a rows + store pair."""

    def __init__(
        self,
        name: str,
        names: TopicNames,
        registry: SchemaRegistry,
        *,
        only_sales: Collection[str] | None = None,
    ) -> None:
        self.name = name
        # Every fact is on the decisions topic: the command topic is not read at all.
        self.topics: tuple[str, ...] = (names.decisions,)
        self.passes_over: frozenset[bytes] = frozenset()
        self._only_sales = frozenset(only_sales) if only_sales is not None else None

    def rows(self, records: Sequence[Decoded]) -> BatchRows:
        """The batch's rows: one outcome per intent id, sales, closures."""
        rows = BatchRows(self._only_sales)
        for r in records:
            rows.add(r.name, r.record)
        rows.prepared()  # here, not in the runner's writer thread (see ``Prepared``)
        return rows

    def write(self, conn: psycopg.Connection, rows: BatchRows) -> int:
        """Store the rows."""
        return store.write(conn, rows)


class PostgresProjector(ProjectionRunner):
    """The outcomes projection on the shared runner (the ``flashsale projector`` service)."""

    def __init__(
        self,
        bootstrap: str,
        dsn: str,
        *,
        name: str = DEFAULT_NAME,
        group_id: str = DEFAULT_GROUP,
        topics: TopicNames | None = None,
        only_sales: Collection[str] | None = None,
        batch_size: int = 2000,
        poll_timeout: float = 0.5,
        registry: SchemaRegistry | None = None,
        search_path: str | None = None,
    ) -> None:
        registry = registry or default_registry()
        names = topics or TopicNames(SKU_COMMANDS, DECISIONS, DEAD_LETTERS)
        projection = OutcomesProjection(name, names, registry, only_sales=only_sales)
        super().__init__(
            bootstrap,
            dsn,
            projection,
            group_id=group_id,
            batch_size=batch_size,
            poll_timeout=poll_timeout,
            registry=registry,
            search_path=search_path,
        )


def main(
    settings: Settings,
    *,
    name: str = DEFAULT_NAME,
    group_id: str = DEFAULT_GROUP,
    only_sales: Collection[str] | None = None,
    batch_size: int = 2000,
) -> None:
    """Composition root: build the projector from settings, run until SIGTERM/SIGINT."""
    logs.configure(service="projector")
    use_short_switch_interval()
    projector = PostgresProjector(
        settings.kafka_bootstrap,
        settings.database_url,
        name=name,
        group_id=group_id,
        topics=TopicNames.of(settings),
        only_sales=only_sales,
        batch_size=batch_size,
    )
    metrics = ServiceMetrics(settings, "projector")
    metrics.stats(projector.stats)
    metrics.lag(settings.kafka_bootstrap, group_id, projector.topics)
    stop = stop_on_signals(log, "projection.signal")
    with metrics.serving():
        projector.run(stop)


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m projections.postgres``: run one projector (settings from FLASHSALE_*)."""
    parser = argparse.ArgumentParser(prog="python -m projections.postgres")
    parser.add_argument("--projection", default=DEFAULT_NAME, help="name its offsets go under")
    parser.add_argument("--group", default=DEFAULT_GROUP, help="Kafka consumer group id")
    parser.add_argument(
        "--only-sale", action="append", help="project only this sale id (repeatable)"
    )
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args(argv)
    main(
        Settings.from_env(),
        name=args.projection,
        group_id=args.group,
        only_sales=args.only_sale,
        batch_size=args.batch_size,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
