"""PostgresProjector: decisions and sale records from Kafka into Postgres read models.

Postgres, not Kafka, holds the projection's position: each batch's rows and the next offset
of every partition it touched are committed in one transaction, and on assignment the
consumer seeks to the stored offsets. A crash anywhere therefore replays at most the
uncommitted batch, whose inserts are idempotent by intent id.

Run one: ``python -m projections.postgres [--group G] [--projection P] [--only-sale S]...``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Collection, Sequence
from types import FrameType

import psycopg
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from flashsale import logs
from flashsale.settings import Settings
from flashsale.topics import DEAD_LETTERS, DECISIONS, SKU_COMMANDS, TopicNames
from projections import store
from projections.rows import BatchRows
from projections.store import reset
from schemas.codec import SchemaRegistry, UndecodableRecord, default_registry

__all__ = ["PostgresProjector", "ProjectionError", "main", "reset"]

log = structlog.get_logger(__name__)

DEFAULT_NAME = "postgres-projector"
DEFAULT_GROUP = "flashsale-projector"


class ProjectionError(RuntimeError):
    """The projector cannot go on (a fatal Kafka error, or not caught up in time)."""


class PostgresProjector:
    """Consumes DECISIONS and SKU_COMMANDS; writes sales, orders, outcomes and counters."""

    def __init__(
        self,
        bootstrap: str,
        dsn: str,
        *,
        name: str = DEFAULT_NAME,
        group_id: str = DEFAULT_GROUP,
        topics: TopicNames | None = None,
        only_sales: Collection[str] | None = None,
        batch_size: int = 500,
        poll_timeout: float = 0.5,
        registry: SchemaRegistry | None = None,
    ) -> None:
        self.name = name
        self._dsn = dsn
        names = topics or TopicNames(SKU_COMMANDS, DECISIONS, DEAD_LETTERS)
        self.topics = (names.decisions, names.sku_commands)
        self._only_sales = frozenset(only_sales) if only_sales is not None else None
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._registry = registry or default_registry()
        # Records of these schemas (their current version) are passed over undecoded.
        self._skipped = frozenset({self._registry.fingerprint("PurchaseIntent")})
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group_id,
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
            }
        )
        # Next offset to project per assigned partition (from Postgres, then each batch).
        self._next: dict[tuple[str, int], int] = {}
        self._subscribed = False
        self.rows_written = 0
        self.records_seen = 0
        self.busy_seconds = 0.0  # time in batches that had records: rows / this = throughput

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Connect to Postgres and subscribe; partitions arrive with the first consume."""
        if self._conn is None:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
        if not self._subscribed:
            self._consumer.subscribe(
                list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            self._subscribed = True

    def stop(self) -> None:
        """Ask ``run`` to return after the current batch."""
        self._stop.set()

    def close(self) -> None:
        """Leave the group and close the Postgres connection."""
        self._consumer.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Project batches until ``stop_event`` (or ``stop()``) is set, then close."""
        stop = stop_event or self._stop
        self.start()
        log.info("projection.started", projection=self.name, topics=list(self.topics))
        try:
            while not (stop.is_set() or self._stop.is_set()):
                self.poll_batch()
        finally:
            self.close()
            log.info("projection.stopped", projection=self.name, rows=self.rows_written)

    def run_until_caught_up(self, timeout: float = 30.0) -> int:
        """Project until every partition reaches its high watermark as of this call.

        Returns the rows written meanwhile. The consumer stays open (call ``close``).
        """
        self.start()
        deadline = time.monotonic() + timeout
        targets = self._high_watermarks(timeout)
        before = self.rows_written
        while not self._caught_up(targets):
            if time.monotonic() > deadline:
                raise ProjectionError(f"{self.name} not caught up after {timeout}s")
            self.poll_batch()
        return self.rows_written - before

    # -- one batch ---------------------------------------------------------------------
    def poll_batch(self) -> int:
        """Consume and write one batch; return the rows in it."""
        began = time.monotonic()
        messages = self._consumer.consume(self._batch_size, self._poll_timeout)
        if not messages:
            return 0
        rows = BatchRows(self._only_sales)
        offsets: dict[tuple[str, int], int] = {}
        undecodable = 0
        for msg in messages:
            if msg.error() is not None:
                self._on_kafka_error(msg)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            offsets[(topic, partition)] = offset + 1
            value = msg.value() or b""
            if value[2:10] in self._skipped:
                continue  # an intent: nothing to project, not worth decoding (~28% of the time)
            try:
                name, record = self._registry.decode(value)
            except UndecodableRecord as exc:
                # The processor dead-letters these; the projection just moves past them.
                undecodable += 1
                log.warning(
                    "projection.undecodable",
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    reason=exc.reason,
                )
                continue
            rows.add(name, record)
        if not offsets:
            return 0
        assert self._conn is not None
        inserted = store.write_batch(self._conn, self.name, rows, offsets)
        self._next.update(offsets)
        self._consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
            asynchronous=True,
        )  # informational only (lag monitoring): Postgres holds the position
        self.records_seen += len(messages)
        self.rows_written += len(rows)
        self.busy_seconds += time.monotonic() - began
        log.info(
            "projection.batch",
            records=len(messages),
            rows=len(rows),
            outcomes_inserted=inserted,
            undecodable=undecodable,
            partitions=len(offsets),
        )
        return len(rows)

    # -- Kafka callbacks and helpers ---------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._conn is not None
        stored = store.read_offsets(self._conn, self.name, self.topics)
        for tp in partitions:
            tp.offset = stored.get((tp.topic, tp.partition), OFFSET_BEGINNING)
            self._next[(tp.topic, tp.partition)] = max(tp.offset, 0)
        consumer.assign(partitions)
        log.info(
            "projection.assigned",
            projection=self.name,
            partitions=[f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions],
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)
        consumer.unassign()

    def _on_kafka_error(self, msg: Message) -> None:
        err = msg.error()
        if err is not None and err.fatal():
            raise ProjectionError(f"fatal Kafka error: {err}")
        if err is not None and err.code() != KafkaError._PARTITION_EOF:
            log.warning("projection.kafka_error", error=str(err))

    def _high_watermarks(self, timeout: float) -> dict[tuple[str, int], int]:
        metadata = self._consumer.list_topics(timeout=timeout)
        targets = {}
        for topic in self.topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                raise ProjectionError(f"topic {topic} is not available")
            for p in meta.partitions:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=timeout
                )
                targets[(topic, p)] = high
        return targets

    def _caught_up(self, targets: dict[tuple[str, int], int]) -> bool:
        if set(targets) - set(self._next):
            return False  # not (yet) assigned everything
        behind = [tp for tp, high in targets.items() if self._next[tp] < high]
        if not behind:
            return True
        # Transaction markers take offsets but are never delivered: trust the position too.
        positions = self._consumer.position([TopicPartition(t, p) for t, p in behind])
        return all(tp.offset >= targets[(tp.topic, tp.partition)] for tp in positions)


def main(
    settings: Settings,
    *,
    name: str = DEFAULT_NAME,
    group_id: str = DEFAULT_GROUP,
    only_sales: Collection[str] | None = None,
    batch_size: int = 500,
) -> None:
    """Composition root: build the projector from settings, run until SIGTERM/SIGINT."""
    logs.configure(service="projector")
    projector = PostgresProjector(
        settings.kafka_bootstrap,
        settings.database_url,
        name=name,
        group_id=group_id,
        topics=TopicNames.of(settings),
        only_sales=only_sales,
        batch_size=batch_size,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("projection.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    projector.run(stop)


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m projections.postgres``: run one projector (settings from FLASHSALE_*)."""
    parser = argparse.ArgumentParser(prog="python -m projections.postgres")
    parser.add_argument("--projection", default=DEFAULT_NAME, help="name its offsets go under")
    parser.add_argument("--group", default=DEFAULT_GROUP, help="Kafka consumer group id")
    parser.add_argument(
        "--only-sale", action="append", help="project only this sale id (repeatable)"
    )
    parser.add_argument("--batch-size", type=int, default=500)
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
