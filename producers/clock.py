"""The sale clock: ticks on every partition of the command topic, and each draw's reveal.

Windows are judged on the log's time, so a window ends only when a record with a later log
time reaches the SKU's writer. The clock writes a ``ClockTick`` to every partition every
``FLASHSALE_CLOCK_TICK_MS`` (1 s by default), so a pre-queue that nobody reveals expires at
its sale's end even when no intent arrives (and, later, holds expire on time).

It also keeps the draws' seeds (``DrawSeeds``, in PostgreSQL: generated when a pre-queue sale
is opened, only the SHA-256 commitment goes into the log) and writes each seed to its SKUs'
partitions as ``RevealDraw`` once the wall clock passes the sale's start. The writer accepts a
reveal only at or after the start by log time and only if it matches the commitment, so the
clock reveals ``REVEAL_MARGIN_MS`` after the start by its own clock; a reveal refused anyway
(this host's clock more than that ahead of the broker's) is a ``SaleRefused`` in the log and
a warning in the writer's log. A seed is marked revealed once Kafka acknowledged its reveal;
a crash before that reveals it again, and the writer ignores every reveal after the first
accepted one (one draw per sale).
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import psycopg
import structlog

from flashsale.settings import Settings, env_int
from processors.core.prequeue import commitment

log = structlog.get_logger(__name__)

TICK_MS = 1_000
REVEAL_MARGIN_MS = 1_000
"""How long after a sale's start its seed is revealed: the writer judges the start on the
broker's log time, and this host's clock may run a little ahead of the broker's."""


@dataclass(frozen=True, slots=True)
class Due:
    """A draw whose seed is due to be revealed."""

    sale_id: str
    skus: tuple[str, ...]
    seed: str


class DrawSeeds:
    """``draw_seeds`` rows: one secret seed per pre-queue sale until its reveal."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def commit(self, sale_id: str, skus: Sequence[str], reveal_at_ms: int) -> str:
        """The commitment of the sale's seed, made now (or the one made for it before: a
        retried opening gets the same seed)."""
        seed = secrets.token_hex(32)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO draw_seeds (sale_id, skus, seed, commitment, reveal_at) "
                "VALUES (%s, %s, %s, %s, to_timestamp(%s / 1000.0)) "
                "ON CONFLICT (sale_id) DO NOTHING",
                (sale_id, list(skus), seed, commitment(seed), reveal_at_ms),
            )
            row = conn.execute(
                "SELECT commitment FROM draw_seeds WHERE sale_id = %s", (sale_id,)
            ).fetchone()
        assert row is not None
        return str(row[0])

    def due(self, now_ms: int) -> list[Due]:
        """Seeds whose reveal time has come and whose draw is not in the log yet."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT sale_id, skus, seed FROM draw_seeds WHERE revealed_at IS NULL "
                "AND reveal_at <= to_timestamp(%s / 1000.0) ORDER BY reveal_at",
                (now_ms,),
            ).fetchall()
        return [Due(r[0], tuple(r[1]), r[2]) for r in rows]

    def revealed(self, sale_ids: Sequence[str]) -> None:
        """The draws are in the log: stop revealing them."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE draw_seeds SET revealed_at = now() WHERE sale_id = ANY(%s) "
                "AND revealed_at IS NULL",
                (list(sale_ids),),
            )


class SaleClock:
    """One ``step`` per tick: a tick to every partition, then the reveals that are due."""

    def __init__(
        self, producer: Any, seeds: DrawSeeds, partitions: int, margin_ms: int = REVEAL_MARGIN_MS
    ) -> None:
        self.producer = producer
        self.seeds = seeds
        self.partitions = partitions
        self.margin_ms = margin_ms

    def step(self, now_ms: int) -> list[str]:
        """Write the ticks and the due reveals; the sale ids revealed."""
        self.producer.tick(range(self.partitions))
        revealed = []
        for due in self.seeds.due(now_ms - self.margin_ms):
            self.producer.reveal_draw(due.sale_id, due.skus, due.seed)  # acknowledged, then:
            self.seeds.revealed([due.sale_id])
            log.info("clock.revealed", sale_id=due.sale_id, skus=len(due.skus))
            revealed.append(due.sale_id)
        return revealed


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`flashsale clock`: tick and reveal until SIGTERM/SIGINT."""
    import os

    from flashsale.topics import TopicNames
    from infra.stack import Stack
    from producers.commands import CommandProducer

    ep = Stack(settings).endpoints()
    names = TopicNames.of(dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap))
    tick_ms = env_int(os.environ, "FLASHSALE_CLOCK_TICK_MS", TICK_MS, 10)
    producer = CommandProducer(ep.bootstrap, "flashsale-clock", topic=names.sku_commands)
    clock = SaleClock(producer, DrawSeeds(ep.dsn), settings.partitions)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("clock.signal", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("clock.started", tick_ms=tick_ms, partitions=settings.partitions)
    while not stopping.is_set():
        started = time.monotonic()
        clock.step(int(time.time() * 1000))
        stopping.wait(max(0.0, tick_ms / 1000 - (time.monotonic() - started)))
    producer.close()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale clock` (the sale clock in the foreground)."""
    p = sub.add_parser("clock", help="write clock ticks and reveal draws until stopped")
    p.set_defaults(run=run)
