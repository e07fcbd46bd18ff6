"""The sale clock: ticks on every partition of the command topic, and each draw's reveal.

Windows are judged on the log's time, so a window ends only when a record with a later log
time reaches the SKU's writer. While a pre-queue sale of the namespace is open (or ended less
than 10 s ago), the clock writes a ``ClockTick`` to every partition every
``FLASHSALE_CLOCK_TICK_MS`` (1 s by default), so a pre-queue that nobody reveals expires at
its sale's end even when no intent arrives. (Ticks only while needed: the command topic is
kept forever and every audit and rebuild reads it. ``FLASHSALE_CLOCK_ALWAYS=1`` ticks
always.) A sale with holds needs ticks until its end plus the payment window and grace (its
last deadline): ``clock_windows``, written when it opens.

It also keeps the draws' seeds (``DrawSeeds``, in PostgreSQL, per namespace: made when a
pre-queue sale is opened; only the SHA-256 commitment goes into the log) and writes each seed
to its SKUs' partitions as ``RevealDraw`` once the opening is complete (every SKU's
``SaleOpened`` is in the log, so the reveal lands behind it) and the **broker's** clock has
passed the start by ``REVEAL_MARGIN_MS``: the log append time of the tick it just wrote, the
clock the writer judges the start by. A seed is marked revealed once Kafka acknowledged its
reveal; a crash before that reveals it again, and the writer ignores every reveal after the
first accepted one (one draw per sale). A failed step (PostgreSQL or Kafka not answering) is
logged and retried at the next tick.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from confluent_kafka import KafkaException

from flashsale.settings import Settings, env_int
from infra.signals import stop_on_signals
from processors.core.prequeue import commitment
from producers.commands import NotAcknowledged

log = structlog.get_logger(__name__)

TICK_MS = 1_000
REVEAL_MARGIN_MS = 1_000
"""How long after a sale's start (by the broker's clock) its seed is revealed: in a cluster
the partition leaders' clocks may differ a little from the one whose time the tick carried."""


@dataclass(frozen=True, slots=True)
class Due:
    """A draw whose seed is due to be revealed."""

    sale_id: str
    skus: tuple[str, ...]
    seed: str


class DrawSeeds:
    """``draw_seeds`` rows of one namespace: one secret seed per pre-queue sale until its
    reveal (each namespace has its own topics and its own clock)."""

    def __init__(self, dsn: str, namespace: str) -> None:
        self.dsn = dsn
        self.namespace = namespace
        self._conn: psycopg.Connection[Any] | None = None  # kept: the clock asks every tick

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The kept connection (opened on first use); dropped after an error, so the next
        call connects again."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        try:
            yield self._conn
        except psycopg.Error:
            self._conn.close()
            self._conn = None
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def commit(self, sale_id: str, skus: Sequence[str], reveal_at_ms: int, ends_at_ms: int) -> str:
        """The commitment of the sale's seed, made now, or the one made for it before (a
        retried opening gets the same seed; its window, which may have moved, replaces the
        old one while the seed is unrevealed)."""
        seed = secrets.token_hex(32)
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO draw_seeds (namespace, sale_id, skus, seed, commitment, reveal_at, "
                "ends_at) VALUES (%s, %s, %s, %s, %s, to_timestamp(%s / 1000.0), "
                "to_timestamp(%s / 1000.0)) ON CONFLICT (namespace, sale_id) DO UPDATE SET "
                "skus = EXCLUDED.skus, reveal_at = EXCLUDED.reveal_at, ends_at = EXCLUDED.ends_at "
                "WHERE draw_seeds.revealed_at IS NULL",
                (self.namespace, sale_id, list(skus), seed, commitment(seed), reveal_at_ms,
                 ends_at_ms),
            )  # fmt: skip
            row = conn.execute(
                "SELECT commitment FROM draw_seeds WHERE namespace = %s AND sale_id = %s",
                (self.namespace, sale_id),
            ).fetchone()
        if row is None:
            raise RuntimeError(f"draw seed of {sale_id!r} not kept")
        return str(row[0])

    def armed(self, sale_id: str) -> None:
        """Every SKU's SaleOpened is in the log: the seed may be revealed (behind them)."""
        with self._connection() as conn:
            conn.execute(
                "UPDATE draw_seeds SET armed_at = now() WHERE namespace = %s AND sale_id = %s "
                "AND armed_at IS NULL",
                (self.namespace, sale_id),
            )

    def due(self, log_time_ms: int) -> list[Due]:
        """Armed seeds whose reveal time the broker's clock has passed, not revealed yet."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT sale_id, skus, seed FROM draw_seeds WHERE namespace = %s "
                "AND revealed_at IS NULL AND armed_at IS NOT NULL "
                "AND reveal_at <= to_timestamp(%s / 1000.0) ORDER BY reveal_at",
                (self.namespace, log_time_ms),
            ).fetchall()
        return [Due(r[0], tuple(r[1]), r[2]) for r in rows]

    def revealed(self, sale_ids: Sequence[str]) -> None:
        """The reveals are in the log (acknowledged): stop revealing them."""
        with self._connection() as conn:
            conn.execute(
                "UPDATE draw_seeds SET revealed_at = now() WHERE namespace = %s "
                "AND sale_id = ANY(%s) AND revealed_at IS NULL",
                (self.namespace, list(sale_ids)),
            )

    def keep_ticking(self, sale_id: str, until_ms: int) -> None:
        """The sale's deadlines need ticks until ``until_ms`` (its holds' last deadline)."""
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO clock_windows (namespace, sale_id, tick_until) VALUES "
                "(%s, %s, to_timestamp(%s / 1000.0)) ON CONFLICT (namespace, sale_id) DO "
                "UPDATE SET tick_until = greatest(clock_windows.tick_until, "
                "EXCLUDED.tick_until)",
                (self.namespace, sale_id, until_ms),
            )

    def ticking(self, now_ms: int, after_end_ms: int = 10_000) -> bool:
        """Whether a pre-queue sale of the namespace is open or just ended, or a sale's
        holds may still expire (ticks needed)."""
        since = now_ms - after_end_ms
        with self._connection() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM draw_seeds WHERE namespace = %s "
                "AND ends_at >= to_timestamp(%s / 1000.0)) OR EXISTS (SELECT 1 FROM "
                "clock_windows WHERE namespace = %s AND tick_until >= to_timestamp(%s / 1000.0))",
                (self.namespace, since, self.namespace, since),
            ).fetchone()
        return bool(row and row[0])


class SaleClock:
    """One ``step`` per tick: a tick to every partition, then the reveals that are due."""

    def __init__(
        self, producer: Any, seeds: DrawSeeds, partitions: int, margin_ms: int = REVEAL_MARGIN_MS
    ) -> None:
        self.producer = producer
        self.seeds = seeds
        self.partitions = partitions
        self.margin_ms = margin_ms

    def step(self, now_ms: int, always: bool = False) -> list[str]:
        """Tick every partition while a pre-queue sale needs it (or ``always``), then write
        the reveals the broker's clock has made due; the sale ids revealed."""
        if not (always or self.seeds.ticking(now_ms)):
            return []
        log_time = self.producer.tick(range(self.partitions))  # the broker's clock
        revealed = []
        for due in self.seeds.due(log_time - self.margin_ms):
            self.producer.reveal_draw(due.sale_id, due.skus, due.seed)  # acknowledged, then:
            self.seeds.revealed([due.sale_id])
            log.info("clock.revealed", sale_id=due.sale_id, skus=len(due.skus))
            revealed.append(due.sale_id)
        return revealed


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`flashsale clock`: tick and reveal until SIGTERM/SIGINT."""
    import os

    from flashsale.service_metrics import ServiceMetrics
    from flashsale.topics import TopicNames
    from infra.stack import Stack
    from producers.commands import CommandProducer

    ep = Stack(settings).endpoints()
    names = TopicNames.of(dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap))
    tick_ms = env_int(os.environ, "FLASHSALE_CLOCK_TICK_MS", TICK_MS, 10)
    producer = CommandProducer(ep.bootstrap, "flashsale-clock", topic=names.sku_commands)
    clock = SaleClock(producer, DrawSeeds(ep.dsn, settings.namespace), settings.partitions)
    stopping = stop_on_signals(log, "clock.signal")
    log.info("clock.started", tick_ms=tick_ms, partitions=settings.partitions)
    always = os.environ.get("FLASHSALE_CLOCK_ALWAYS", "0") == "1"
    totals = {"steps": 0, "reveals": 0, "failed_steps": 0}
    metrics = ServiceMetrics(settings, "clock")
    metrics.stats(lambda: dict(totals))
    with metrics.serving():
        while not stopping.is_set():
            started = time.monotonic()
            try:
                totals["reveals"] += len(clock.step(int(time.time() * 1000), always))
                totals["steps"] += 1
            except (psycopg.Error, NotAcknowledged, KafkaException) as exc:  # next tick retries
                totals["failed_steps"] += 1
                log.warning("clock.step_failed", error=str(exc))
            stopping.wait(max(0.0, tick_ms / 1000 - (time.monotonic() - started)))
    producer.close()
    clock.seeds.close()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale clock` (the sale clock in the foreground)."""
    p = sub.add_parser("clock", help="write clock ticks and reveal draws until stopped")
    p.set_defaults(run=run)
