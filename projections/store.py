"""The outcomes projection's PostgreSQL side: sales, outcomes (orders are a view) and counters.

``write`` runs inside the projection runner's transaction (which also moves the tracking
offsets), so a batch's rows land all together or not at all.

Fast path: outcomes go in with ``COPY`` (its text made before the write:
``BatchRows.prepared``), ~3x the rows/s of an ``INSERT ... ON CONFLICT`` over the same rows.
The runner only hands over records past the tracked offsets, so on a log with one decision
per intent id (what the writer guarantees) nothing conflicts. A log that repeats a decision
in a later batch, or a second projection writing the same tables, makes ``COPY`` hit a
unique key: the batch then rolls back to a savepoint and goes in with ``ON CONFLICT DO
NOTHING``, and only the rows actually inserted (``RETURNING``) are counted. Either way a
decision counts once.

Counters are computed from the inserted rows in Python (``rows.counter_rows``): one upsert
per (sale, SKU) instead of one per outcome. Nothing is notified: the app servers read the
decisions topic themselves (``producers.http.livefeed``). ``remaining``/``last_sequence``
follow the greatest sequence among decisions and the sale facts that carry a remaining count
(opened, closed, units returned, settled), so counters do not depend on the order batches
arrive in.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import errors

from projections.rows import BatchRows, OutcomeRow, counter_rows

PROJECTION_TABLES = ("sales", "intent_outcomes", "sale_counters", "lifecycle_events")
"""The tables the projection writes (and ``reset`` empties)."""
READ_MODELS = ("sales", "orders", "intent_outcomes", "sale_counters", "lifecycle_events")
"""What a replay compares: the tables and the ``orders`` view (accepted outcomes with their
lifecycle status)."""

_OUTCOME_COLUMNS = (
    "intent_id, sale_id, sku, user_id, quantity, outcome, reason, detail, order_id, remaining,"
    " sequence, decided_at, draw_rank, draw_size"
)
_ORDER_COLUMNS = (
    "order_id, intent_id, sale_id, sku, user_id, quantity, decided_at, sequence, status, pay_by"
)
_LIFECYCLE_COLUMNS = (
    "sale_id, sku, sequence, kind, order_id, intent_id, attempt_id, user_id, quantity, detail,"
    " decided_at"
)
# Each fact once: a repeated one (a replay over rows kept, a second projection) adds nothing.
_LIFECYCLE_SQL = f"""
INSERT INTO lifecycle_events ({_LIFECYCLE_COLUMNS})
SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[],
                     %s::text[], %s::text[], %s::int[], %s::text[], %s::timestamptz[])
ON CONFLICT DO NOTHING
"""

# Epoch milliseconds <-> timestamptz, exactly (no float on the way).
_MILLIS = "(timestamptz 'epoch' + {} * interval '1 millisecond')"
_EPOCH_MS = "(extract(epoch FROM {}) * 1000)::bigint"

_OUTCOMES_SLOW_SQL = f"""
INSERT INTO intent_outcomes ({_OUTCOME_COLUMNS})
SELECT i, s, k, u, q, o, r, d, oid, rem, seq, {_MILLIS.format("at")}, rank, size FROM unnest(
    %s::text[], %s::text[], %s::text[], %s::text[], %s::int[], %s::text[], %s::text[],
    %s::text[], %s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::int[], %s::int[])
    AS t(i, s, k, u, q, o, r, d, oid, rem, seq, at, rank, size)
ON CONFLICT (intent_id) DO NOTHING
RETURNING intent_id, sale_id, sku, user_id, quantity, outcome, reason, detail, order_id,
          remaining, sequence, {_EPOCH_MS.format("decided_at")}, draw_rank, draw_size
"""


def jsonb_sum(left: str, right: str) -> str:
    """SQL adding two ``{key: count}`` jsonb objects key by key (for upserts of counts)."""
    return f"""(
        SELECT coalesce(jsonb_object_agg(key, total), '{{}}'::jsonb)
        FROM (SELECT key, sum(value::bigint) AS total
              FROM (SELECT * FROM jsonb_each_text({left})
                    UNION ALL
                    SELECT * FROM jsonb_each_text({right})) kv
              GROUP BY key) s)"""


_COUNTERS_SQL = f"""
INSERT INTO sale_counters AS c (sale_id, sku, accepted_intents, accepted_units,
                                rejected_intents, rejected_by_reason, remaining, last_sequence)
SELECT s, k, a, u, r, b::jsonb, rem, last
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[],
            %s::int[], %s::bigint[]) AS t(s, k, a, u, r, b, rem, last)
ON CONFLICT (sale_id, sku) DO UPDATE SET
    accepted_intents = c.accepted_intents + excluded.accepted_intents,
    accepted_units = c.accepted_units + excluded.accepted_units,
    rejected_intents = c.rejected_intents + excluded.rejected_intents,
    rejected_by_reason = {jsonb_sum("c.rejected_by_reason", "excluded.rejected_by_reason")},
    remaining = CASE WHEN excluded.last_sequence > c.last_sequence
                     THEN excluded.remaining ELSE c.remaining END,
    last_sequence = greatest(c.last_sequence, excluded.last_sequence)
"""

_SALES_SQL = """
INSERT INTO sales (sale_id, sku, allocation, per_user_limit, per_order_max, starts_at,
                   ends_at, opened_event_id, hold_ms)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING
"""

# A sale's counters row exists from its opening; its remaining is the allocation (the
# SaleOpened mark, whose sequence is above any rejection of the sale before it opened).
_SALE_COUNTERS_SQL = """
INSERT INTO sale_counters (sale_id, sku, remaining) VALUES (%s, %s, %s)
ON CONFLICT (sale_id, sku) DO NOTHING
"""

_CLOSE_SQL = "UPDATE sales SET closed = true WHERE sale_id = %s AND sku = %s"

_json = msgspec.json.Encoder()


def write(conn: psycopg.Connection, rows: BatchRows) -> int:
    """Write one batch's rows (inside the caller's transaction); return outcomes inserted."""
    with conn.cursor() as cur:
        if rows.sales:
            cur.executemany(_SALES_SQL, rows.sales)
            cur.executemany(_SALE_COUNTERS_SQL, [(s[0], s[1], s[2]) for s in rows.sales])
        if rows.closures:
            cur.executemany(_CLOSE_SQL, rows.closures)
        if rows.lifecycle:
            cur.execute(_LIFECYCLE_SQL, [list(c) for c in zip(*rows.lifecycle, strict=True)])
        counters = rows.prepared().counters
        inserted: Sequence[OutcomeRow] = ()
        if rows.outcomes:
            inserted = _insert_outcomes(conn, cur, rows)
            if len(inserted) < len(rows.outcomes):  # some were there: count only the new
                counters = counter_rows(inserted, rows.marks)
        if counters:
            columns = [list(c) for c in zip(*counters, strict=True)]
            columns[5] = [_json.encode(by).decode() for by in columns[5]]
            cur.execute(_COUNTERS_SQL, columns)
        return len(inserted)


def _insert_outcomes(
    conn: psycopg.Connection, cur: psycopg.Cursor, rows: BatchRows
) -> Sequence[OutcomeRow]:
    """Insert the batch's outcomes; return those that were new."""
    outcomes = list(rows.outcomes.values())
    try:
        # A savepoint: a conflict undoes only this part.
        copy_sql = f"COPY intent_outcomes ({_OUTCOME_COLUMNS}) FROM STDIN"
        with conn.transaction(), cur.copy(copy_sql) as copy:
            copy.write(rows.prepared().outcomes_text)
        return outcomes
    except errors.UniqueViolation:
        pass  # some were projected already (a repeated decision, a second projection)
    cur.execute(_OUTCOMES_SLOW_SQL, [list(c) for c in zip(*outcomes, strict=True)])
    inserted: list[OutcomeRow] = cur.fetchall()
    return inserted


_DUMPS = {
    "sales": "SELECT sale_id, sku, allocation, per_user_limit, per_order_max, starts_at, ends_at,"
    " closed, opened_event_id, hold_ms FROM sales",
    "orders": f"SELECT {_ORDER_COLUMNS} FROM orders",
    "intent_outcomes": f"SELECT {_OUTCOME_COLUMNS} FROM intent_outcomes",
    "sale_counters": "SELECT sale_id, sku, accepted_intents, accepted_units, rejected_intents,"
    " rejected_by_reason, remaining, last_sequence FROM sale_counters",
    "lifecycle_events": f"SELECT {_LIFECYCLE_COLUMNS} FROM lifecycle_events",
}


def dump(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every projection table as sorted tuples (in the connection's schema), for comparison."""
    return {t: sorted(conn.execute(q).fetchall()) for t, q in _DUMPS.items()}


def reset(dsn: str, projection: str, sale_ids: Collection[str] | None = None) -> None:
    """Forget ``projection``: empty its tables (or only ``sale_ids``' rows) and its offsets.

    The next run replays the topics from offset 0 (or from offsets seeded meanwhile).
    """
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        if sale_ids is None:
            conn.execute(f"TRUNCATE {', '.join(PROJECTION_TABLES)}")
        else:
            for table in PROJECTION_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE sale_id = ANY(%s)", (list(sale_ids),))
        conn.execute("DELETE FROM projection_offsets WHERE projection = %s", (projection,))
