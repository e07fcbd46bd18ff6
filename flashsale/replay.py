"""`flashsale replay`: rebuild every projection from offset 0 and compare it with the live one.

The namespace's topics are projected from offset 0 into a fresh PostgreSQL schema
(``replay_<random>``, dropped afterwards unless ``--keep``), with notifications off so no
user hears of an outcome twice. Once the replay has caught up, and the live projection has
reached the very same offsets, every projection table is compared for the sales found in the
replayed log (the live tables are shared by all namespaces): row count and a checksum of the
rows (every column but ``projected_at``, the wall-clock time of the write). Exit 0 when all
tables are identical, 1 on any difference, 2 when the comparison cannot be made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from confluent_kafka import KafkaException
from psycopg import sql
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from flashsale.settings import Settings
from flashsale.topics import TopicNames
from projections import analytics, schema
from projections.commands import live_name
from projections.postgres import PostgresProjector
from projections.runner import ProjectionError, ProjectionRunner, read_offsets
from projections.store import READ_MODELS

# Columns that record when a row was written, not what the log says.
VOLATILE_COLUMNS = frozenset({"projected_at"})


class ReplayError(RuntimeError):
    """The comparison cannot be made (the live projection never reached the replay)."""


@dataclasses.dataclass
class TableDiff:
    """One table compared: row counts and checksums, live and replayed."""

    table: str
    live_rows: int
    replayed_rows: int
    live_checksum: str
    replayed_checksum: str

    @property
    def same(self) -> bool:
        return (self.live_rows, self.live_checksum) == (self.replayed_rows, self.replayed_checksum)


@dataclasses.dataclass
class Replay:
    """What a replay projected and how it compared."""

    schema: str
    sales: list[str]
    offsets: int
    seconds: float
    tables: list[TableDiff]

    @property
    def same(self) -> bool:
        return all(t.same for t in self.tables)

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": "same" if self.same else "different",
            "schema": self.schema,
            "sales": len(self.sales),
            "offsets_replayed": self.offsets,
            "seconds": round(self.seconds, 2),
            "offsets_per_s": round(self.offsets / self.seconds) if self.seconds else None,
            "tables": [{**dataclasses.asdict(t), "same": t.same} for t in self.tables],
        }


def _digest(conn: psycopg.Connection, where: str, table: str, sales: list[str]) -> tuple[int, str]:
    """Row count and an order-independent checksum of ``table``'s rows of ``sales``."""
    columns = [
        c
        for (c,) in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (where, table),
        ).fetchall()
        if c not in VOLATILE_COLUMNS
    ]
    query = sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') FROM"
        " (SELECT md5(row({cols})::text) AS h FROM {table} WHERE sale_id = ANY(%s)) x"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        table=sql.Identifier(where, table),
    )
    row = conn.execute(query, (sales,)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def compare(
    dsn: str, live: str, replayed: str, tables: Sequence[str] = READ_MODELS
) -> tuple[list[str], list[TableDiff]]:
    """Compare ``tables`` for the replayed sales, live schema against replayed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        sales = sorted(
            s
            for (s,) in conn.execute(
                sql.SQL("SELECT sale_id FROM {} UNION SELECT sale_id FROM {}").format(
                    sql.Identifier(replayed, "sales"), sql.Identifier(replayed, "intent_outcomes")
                )
            ).fetchall()
        )
        diffs = []
        for table in tables:
            live_rows, live_sum = _digest(conn, live, table, sales)
            replayed_rows, replayed_sum = _digest(conn, replayed, table, sales)
            diffs.append(TableDiff(table, live_rows, replayed_rows, live_sum, replayed_sum))
    return sales, diffs


def _wait_for_live(
    runner: ProjectionRunner, dsn: str, live_schema: str, live_projection: str, wait_s: float
) -> None:
    """Until the live projection's tracked offsets equal the replay's (catching up on both)."""
    deadline = time.monotonic() + wait_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('search_path', %s, false)", (live_schema,))
        while True:
            live = read_offsets(conn, live_projection, runner.topics)
            mine = runner.positions()
            behind = {tp: o for tp, o in mine.items() if live.get(tp, 0) < o}
            ahead = any(live.get(tp, 0) > o for tp, o in mine.items())
            if not behind and not ahead:
                return
            if time.monotonic() > deadline:
                raise ReplayError(
                    f"the live projection {live_projection!r} never stood at the replay's "
                    f"offsets within {wait_s:.0f}s: behind on {len(behind)} partition(s)"
                    + (
                        " (is its service running? `make up` starts the projector and the"
                        " analytics service; `--no-analytics` leaves the latter out)"
                        if behind
                        else ""
                    )
                    + (", and the log kept moving" if ahead else "")
                )
            if ahead:  # the log moved on while replaying: replay the new records too
                runner.run_until_caught_up(timeout=max(wait_s, 60.0))
            else:
                time.sleep(0.25)


def replay(
    settings: Settings,
    dsn: str,
    *,
    wait_s: float = 60.0,
    keep: bool = False,
    progress: bool = True,
    live_schema: str = "public",
    live_projection: str | None = None,
    live_analytics: str | None = None,
    with_analytics: bool = True,
) -> Replay:
    """Replay the namespace's topics into a fresh schema and compare it with the live one.

    The live projections are the namespace's (``live_name``) in ``public`` unless named;
    ``with_analytics=False`` leaves the analytics projection out.
    """
    scratch = f"replay_{uuid.uuid4().hex[:10]}"
    schema.create(dsn, scratch)
    try:
        runners: list[tuple[ProjectionRunner, str, Sequence[str]]] = [
            (
                PostgresProjector(settings.kafka_bootstrap, dsn, name="replay",
                                  group_id=f"{settings.namespace}-{scratch}",
                                  topics=TopicNames.of(settings), search_path=scratch),
                live_projection or live_name(settings),
                READ_MODELS,
            )
        ]  # fmt: skip
        if with_analytics:
            runners.append((
                analytics.runner(settings, dsn, name="replay-analytics",
                                 group_id=f"{settings.namespace}-{scratch}-analytics",
                                 search_path=scratch),
                live_analytics or analytics.live_name(settings),
                analytics.TABLES,
            ))  # fmt: skip
        began = time.monotonic()
        covered: dict[tuple[str, int], int] = {}  # the log's offsets, whoever read them
        try:
            columns = [
                TextColumn("replaying {task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} offsets"),
                TimeElapsedColumn(),
            ]
            with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
                for runner, _, _ in runners:
                    task = bar.add_task(runner.name, total=0)
                    runner.run_until_caught_up(
                        timeout=3600.0,
                        on_batch=lambda done, total, t=task: bar.update(  # type: ignore[misc]
                            t, completed=done, total=total
                        ),
                    )
            seconds = time.monotonic() - began
            for runner, live, _ in runners:
                _wait_for_live(runner, dsn, live_schema, live, wait_s)
                for tp, offset in runner.positions().items():
                    covered[tp] = max(covered.get(tp, 0), offset)
        finally:
            for runner, _, _ in runners:
                runner.close()
        tables = [t for _, _, names in runners for t in names]
        sales, diffs = compare(dsn, live_schema, scratch, tables)
        return Replay(scratch, sales, sum(covered.values()), seconds, diffs)
    finally:
        if not keep:
            schema.drop(dsn, scratch)


def render(result: Replay) -> str:
    """The human report."""
    lines = [
        f"replay of {result.offsets:,} offsets in {result.seconds:.1f}s"
        f" ({result.offsets / max(result.seconds, 1e-9):,.0f} offsets/s),"
        f" {len(result.sales)} sale(s), into schema {result.schema}",
        f"{'table':<18}{'live rows':>12}{'replayed':>12}  checksum",
    ]
    for t in result.tables:
        verdict = "same" if t.same else f"DIFFERENT ({t.live_checksum} vs {t.replayed_checksum})"
        lines.append(f"{t.table:<18}{t.live_rows:>12,}{t.replayed_rows:>12,}  {verdict}")
    lines.append(
        "verdict: SAME" if result.same else "verdict: DIFFERENT (live != replay of the log)"
    )
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale replay`."""
    p = sub.add_parser(
        "replay", help="rebuild every projection from offset 0 and compare with the live one"
    )
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--keep", action="store_true", help="keep the replay schema (to inspect)")
    p.add_argument(
        "--no-analytics",
        action="store_true",
        help="leave the analytics projection out (its service is not running)",
    )
    p.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the live projection"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Replay and compare; 0 same, 1 different, 2 cannot compare."""
    from infra.stack import Stack
    from projections.runner import use_short_switch_interval

    use_short_switch_interval()  # the replay runs the pipelined projection runner

    stack = Stack(settings)
    started = stack.up()  # after `make demo` the servers are down; leave them as found
    try:
        ep = stack.endpoints()
        resolved = dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap)
        result = replay(resolved, ep.dsn, wait_s=args.wait, keep=args.keep,
                        progress=not args.json, with_analytics=not args.no_analytics)  # fmt: skip
    except (ReplayError, ProjectionError, psycopg.Error, KafkaException) as exc:
        # Exit 1 means "different": a replay that could not finish must not look like one.
        print(f"flashsale: error: replay could not compare: {exc}", file=sys.stderr)
        return 2
    finally:
        if any(started.values()):
            stack.down()
    print(json.dumps(result.as_json(), indent=2) if args.json else render(result))
    return 0 if result.same else 1
