"""`flashsale trace <intent-id>`: everything known about one intent, from every service.

Every log line about one intent carries its id (``intent_id``: the edge's unacknowledged
writes; the payment service's lines about an order carry the intent it was made for,
``processors.core.model.intent_of_order``). The hot paths log per batch with counts, not per
intent: the writer's ``batch.decided`` (debug) names its partition and offsets. This prints
the intent's outcome and lifecycle facts from the projections, then every line of the
namespace's service logs (all services and app servers) that names it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import psycopg

from flashsale.settings import Settings
from infra.services import run_dir
from processors.core.model import order_id_for

_OUTCOME_SQL = """
SELECT sale_id, sku, user_id, quantity, outcome, reason, decided_at, projected_at
FROM intent_outcomes WHERE intent_id = %s
"""
_FACTS_SQL = """
SELECT sequence, kind, detail, decided_at FROM lifecycle_events
WHERE intent_id = %s OR order_id = %s ORDER BY sale_id, sku, sequence
"""


def log_lines(directory: Path, intent_id: str) -> Iterator[tuple[str, str]]:
    """(log file, line) for every line of the service logs under ``directory`` naming it."""
    for path in sorted(directory.rglob("*.log")):
        with path.open(errors="replace") as f:
            for line in f:
                if intent_id in line:
                    yield str(path.relative_to(directory)), line.rstrip()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale trace`."""
    p = sub.add_parser("trace", help="an intent's outcome, facts and log lines in every service")
    p.add_argument("intent_id")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print what the projections and the logs know; 1 when nothing names the intent."""
    from infra.stack import Stack

    found = 0
    dsn = Stack(settings).endpoints().dsn
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
            outcome = conn.execute(_OUTCOME_SQL, (args.intent_id,)).fetchall()
            facts = conn.execute(_FACTS_SQL, (args.intent_id, order_id_for(args.intent_id)))
            for kind, rows in (("outcome", outcome), ("fact", facts.fetchall())):
                for row in rows:
                    found += 1
                    print(f"{kind}: {' '.join(str(v) for v in row)}")
    except psycopg.OperationalError as exc:  # PostgreSQL is down: the logs still answer
        print(f"(projections not read: {exc})")
    for where, line in log_lines(run_dir(settings), args.intent_id):
        found += 1
        print(f"{where}: {line}")
    if not found:
        print(f"nothing names intent {args.intent_id} in namespace {settings.namespace}")
    return 0 if found else 1
