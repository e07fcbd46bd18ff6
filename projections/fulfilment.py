"""An example downstream service: fulfilment, as another team would write it against our
topics' contract (README, *Topics*): it relies on the record names and fields the published
schemas define, and on nothing of the writer's.

It is a consumer group on the decisions topic (read_committed: only committed facts, in
each SKU's order), with manual commits, and an idempotent sink: every ``OrderPaid`` becomes
one ``fulfilment_orders`` row keyed by order id, an ``OrderRefunded`` marks it refunded.
Offsets are committed only after the batch's rows are committed in PostgreSQL, so a crash
redelivers at most the batch in flight, and the key absorbs it (``deliveries`` counts the
redeliveries). Any number of instances share the topic's partitions; a dead one's
partitions move to the others after the group's session timeout.

``FLASHSALE_FULFILMENT_CRASH_AFTER=N`` (a test's fault): the instance SIGKILLs itself once
it has recorded N orders, between the sink's commit and the offsets' commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from confluent_kafka import KafkaError, KafkaException

from flashsale.kafka_auth import Consumer
from flashsale.settings import Settings, env_number
from infra.signals import stop_on_signals
from schemas.codec import SchemaRegistry, UndecodableRecord

log = structlog.get_logger(__name__)
WANTED = ("OrderPaid", "OrderRefunded")

_PAID_SQL = """
INSERT INTO fulfilment_orders (namespace, order_id, sale_id, sku, user_id, quantity, paid_at,
                               recorded_by)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (namespace, order_id) DO UPDATE SET deliveries = fulfilment_orders.deliveries + 1
"""
_REFUNDED_SQL = """
UPDATE fulfilment_orders SET refunded_at = coalesce(refunded_at, %s)
WHERE namespace = %s AND order_id = %s
"""


def _at(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, UTC)


class FulfilmentSink:
    """The idempotent sink: one transaction per consumed batch."""

    def __init__(self, conn: psycopg.Connection[Any], namespace: str, instance: str) -> None:
        self.conn, self.namespace, self.instance = conn, namespace, instance
        self.recorded = 0

    def write(self, facts: list[tuple[str, dict[str, Any]]]) -> None:
        """One batch's facts in one transaction (the connection is in autocommit mode, so
        the block is BEGIN ... COMMIT: committed when it returns)."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            for name, r in facts:
                if name == "OrderPaid":
                    cur.execute(_PAID_SQL, (self.namespace, r["order_id"], r["sale_id"],
                                            r["sku"], r["user_id"], r["quantity"],
                                            _at(r["decided_at"]), self.instance))  # fmt: skip
                    self.recorded += 1
                else:
                    cur.execute(_REFUNDED_SQL, (_at(r["decided_at"]), self.namespace,
                                                r["order_id"]))  # fmt: skip


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`flashsale fulfilment`: record paid orders until SIGTERM/SIGINT."""
    from flashsale.topics import TopicNames
    from infra.stack import Stack

    ep = Stack(settings).endpoints()
    names = TopicNames.of(dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap))
    registry = SchemaRegistry.load_default()
    instance = args.instance or f"fulfilment-{uuid.uuid4().hex[:6]}"
    crash_after = int(env_number(os.environ, "FLASHSALE_FULFILMENT_CRASH_AFTER", 0, 0, 10**9))
    consumer = Consumer({"bootstrap.servers": ep.bootstrap,
                         "group.id": f"{settings.namespace}-fulfilment",
                         "client.id": instance, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                         "log_level": 3})  # fmt: skip
    consumer.subscribe(
        [names.decisions],
        on_assign=lambda _c, parts: log.info(
            "fulfilment.assigned", instance=instance, partitions=sorted(p.partition for p in parts)
        ),
    )
    stopping = stop_on_signals(log, "fulfilment.signal")
    sink = FulfilmentSink(psycopg.connect(ep.dsn, autocommit=True), settings.namespace, instance)
    log.info("fulfilment.started", instance=instance, topic=names.decisions)
    try:
        while not stopping.is_set():
            messages = consumer.consume(500, 0.5)
            facts: list[tuple[str, dict[str, Any]]] = []
            for msg in messages:
                if (error := msg.error()) is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("fulfilment.consume_error", error=str(error))
                    continue
                try:
                    name, record = registry.decode(msg.value() or b"")
                except UndecodableRecord:
                    continue  # not a record of our contract: nothing to fulfil
                if name in WANTED:
                    facts.append((name, record))
            if facts:
                sink.write(facts)
                log.info("fulfilment.recorded", instance=instance, facts=len(facts))
                if crash_after and sink.recorded >= crash_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # the fault: rows in, offsets not
            if messages:
                try:
                    consumer.commit(asynchronous=False)
                except KafkaException as exc:  # e.g. a rebalance took the partitions meanwhile
                    log.warning("fulfilment.commit_failed", error=str(exc))  # redelivered there
    finally:
        consumer.close()
        sink.conn.close()
        log.info("fulfilment.stopped", instance=instance, recorded=sink.recorded)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale fulfilment` (the example downstream consumer group, foreground)."""
    p = sub.add_parser("fulfilment", help="example downstream service: record paid orders once")
    p.add_argument("--instance", help="this instance's name (default: a random one)")
    p.set_defaults(run=run)
