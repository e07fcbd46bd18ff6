"""The projection's Postgres side: rows and tracking offsets written in one transaction."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import psycopg

from projections.rows import BatchRows

PROJECTION_TABLES = ("sales", "orders", "intent_outcomes", "sale_counters")

# Outcomes go in as one statement over unnest()ed column arrays. Only the rows that
# INSERT ... ON CONFLICT DO NOTHING actually inserted (the RETURNING set) feed the counters,
# so a decision redelivered in a later batch, or replayed by a second projector racing this
# one, is counted once. remaining/last_sequence follow the greatest sequence, which makes the
# counters independent of the order batches arrive in (replays interleave topics differently).
# NOTIFY payloads are queued per inserted row and delivered only if the transaction commits.
_OUTCOMES_SQL = """
WITH input AS (
    SELECT * FROM unnest(
        %s::text[], %s::text[], %s::text[], %s::text[], %s::int[], %s::text[], %s::text[],
        %s::text[], %s::text[], %s::int[], %s::bigint[], %s::timestamptz[]
    ) AS t(intent_id, sale_id, sku, user_id, quantity, outcome, reason, detail, order_id,
           remaining, sequence, decided_at)
), ins AS (
    INSERT INTO intent_outcomes (intent_id, sale_id, sku, user_id, quantity, outcome, reason,
                                 detail, order_id, remaining, sequence, decided_at)
    SELECT * FROM input
    ON CONFLICT (intent_id) DO NOTHING
    RETURNING intent_id, sale_id, sku, user_id, quantity, outcome, reason, remaining, sequence
), reasons AS (
    SELECT sale_id, sku, jsonb_object_agg(reason, n) AS by_reason
    FROM (SELECT sale_id, sku, reason, count(*) AS n FROM ins
          WHERE outcome = 'rejected' GROUP BY sale_id, sku, reason) r
    GROUP BY sale_id, sku
), totals AS (
    SELECT sale_id, sku,
           count(*) FILTER (WHERE outcome = 'accepted') AS accepted_intents,
           coalesce(sum(quantity) FILTER (WHERE outcome = 'accepted'), 0) AS accepted_units,
           count(*) FILTER (WHERE outcome = 'rejected') AS rejected_intents,
           (array_agg(remaining ORDER BY sequence DESC))[1] AS remaining,
           max(sequence) AS last_sequence
    FROM ins GROUP BY sale_id, sku
), counted AS (
    INSERT INTO sale_counters AS c (sale_id, sku, accepted_intents, accepted_units,
                                    rejected_intents, rejected_by_reason, remaining,
                                    last_sequence)
    SELECT t.sale_id, t.sku, t.accepted_intents, t.accepted_units, t.rejected_intents,
           coalesce(r.by_reason, '{}'::jsonb), t.remaining, t.last_sequence
    FROM totals t LEFT JOIN reasons r USING (sale_id, sku)
    ON CONFLICT (sale_id, sku) DO UPDATE SET
        accepted_intents = c.accepted_intents + excluded.accepted_intents,
        accepted_units = c.accepted_units + excluded.accepted_units,
        rejected_intents = c.rejected_intents + excluded.rejected_intents,
        rejected_by_reason = (
            SELECT coalesce(jsonb_object_agg(key, total), '{}'::jsonb)
            FROM (SELECT key, sum(value::bigint) AS total
                  FROM (SELECT * FROM jsonb_each_text(c.rejected_by_reason)
                        UNION ALL
                        SELECT * FROM jsonb_each_text(excluded.rejected_by_reason)) kv
                  GROUP BY key) s),
        remaining = CASE WHEN excluded.last_sequence > c.last_sequence
                         THEN excluded.remaining ELSE c.remaining END,
        last_sequence = greatest(c.last_sequence, excluded.last_sequence)
    RETURNING 1
)
SELECT count(pg_notify('intent_outcomes', user_id || ':' || intent_id)::text),
       (SELECT count(*) FROM counted)
FROM ins
"""

_ORDERS_SQL = """
INSERT INTO orders (order_id, intent_id, sale_id, sku, user_id, quantity, decided_at, sequence)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[],
                     %s::timestamptz[], %s::bigint[])
ON CONFLICT DO NOTHING
"""

_SALES_SQL = """
INSERT INTO sales (sale_id, sku, allocation, per_user_limit, per_order_max, starts_at,
                   ends_at, opened_event_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING
"""

# A sale's counters exist from its opening, with the whole allocation remaining; decisions
# (whichever arrives first on replay) then only add to them.
_SALE_COUNTERS_SQL = """
INSERT INTO sale_counters (sale_id, sku, remaining) VALUES (%s, %s, %s)
ON CONFLICT DO NOTHING
"""

_CLOSE_SQL = "UPDATE sales SET closed = true WHERE sale_id = %s AND sku = %s"

# greatest(): a partition revoked mid-batch may be written by two instances; never go back.
_OFFSETS_SQL = """
INSERT INTO projection_offsets (projection, topic, partition, next_offset)
VALUES (%s, %s, %s, %s)
ON CONFLICT (projection, topic, partition) DO UPDATE SET
    next_offset = greatest(projection_offsets.next_offset, excluded.next_offset),
    updated_at = now()
"""


def read_offsets(
    conn: psycopg.Connection, projection: str, topics: Collection[str]
) -> dict[tuple[str, int], int]:
    """Stored next offsets of ``projection`` for ``topics``, by (topic, partition)."""
    rows = conn.execute(
        "SELECT topic, partition, next_offset FROM projection_offsets"
        " WHERE projection = %s AND topic = ANY(%s)",
        (projection, list(topics)),
    ).fetchall()
    return {(t, p): o for t, p, o in rows}


def write_batch(
    conn: psycopg.Connection,
    projection: str,
    rows: BatchRows,
    next_offsets: Mapping[tuple[str, int], int],
) -> int:
    """Write one batch's rows and offsets in one transaction; return outcomes inserted."""
    inserted = 0
    with conn.transaction(), conn.cursor() as cur:
        if rows.sales:
            cur.executemany(_SALES_SQL, rows.sales)
            cur.executemany(_SALE_COUNTERS_SQL, [(s[0], s[1], s[2]) for s in rows.sales])
        if rows.closures:
            cur.executemany(_CLOSE_SQL, rows.closures)
        if rows.outcomes:
            columns = [list(c) for c in zip(*rows.outcomes.values(), strict=True)]
            row = cur.execute(_OUTCOMES_SQL, columns).fetchone()
            inserted = row[0] if row else 0
            orders = rows.orders()
            if orders:  # one statement over column arrays, like the outcomes
                cur.execute(_ORDERS_SQL, [list(c) for c in zip(*orders, strict=True)])
        cur.executemany(_OFFSETS_SQL, [(projection, t, p, o) for (t, p), o in next_offsets.items()])
    return inserted


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
