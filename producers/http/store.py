"""The edge's PostgreSQL side: reads of the projections (the edge writes nothing here)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from producers.http.rules import SkuTerms

STALE_S = 300.0  # sale terms served from memory at most this long while PostgreSQL is away

_SALE_SQL = """
SELECT s.sale_id, s.sku, s.allocation, s.per_user_limit, s.per_order_max, s.starts_at,
       s.ends_at, s.closed, coalesce(c.remaining, s.allocation) AS remaining,
       s.hold_ms IS NOT NULL AS holds, coalesce(l.paused, false) AS paused,
       coalesce(l.added_units, 0) AS added
FROM sales s LEFT JOIN sale_counters c USING (sale_id, sku)
LEFT JOIN lifecycle_counters l USING (sale_id, sku)
WHERE s.sale_id = %s
"""

_OUTCOME_SQL = """
SELECT intent_id, user_id, sale_id, sku, quantity, outcome, reason, detail, order_id, decided_at,
       draw_rank, draw_size
FROM intent_outcomes WHERE intent_id = %s
"""


class EdgeStore:
    """Queries over one async connection pool; sale terms cached briefly per process."""

    def __init__(self, pool: AsyncConnectionPool, sale_ttl_s: float = 0.5) -> None:
        self.pool = pool
        self._ttl = sale_ttl_s
        self._sales: dict[str, tuple[float, dict[str, SkuTerms]]] = {}
        self._refreshing: dict[str, asyncio.Future[dict[str, SkuTerms]]] = {}
        self._retry_at: dict[str, float] = {}  # PostgreSQL away: not asked again before

    async def sale(self, sale_id: str, fresh: bool = False) -> dict[str, SkuTerms]:
        """Terms of a sale's SKUs by SKU (empty when unknown); may lag by the cache TTL.

        Only known sales are cached: a sale that was just opened is seen as soon as it is
        projected, by every server. One query per sale at a time: when the entry is stale,
        the first caller refreshes it and the others are answered from the stale entry
        meanwhile (under a spike every request of a TTL's end would otherwise query).
        """
        now = time.monotonic()
        hit = self._sales.get(sale_id)
        if hit is not None and not fresh:
            if now - hit[0] < self._ttl or now < self._retry_at.get(sale_id, 0.0):
                return hit[1]
            if sale_id in self._refreshing:
                return hit[1]
        pending = self._refreshing.get(sale_id)
        if pending is not None and not fresh:
            return await asyncio.shield(pending)
        task = asyncio.ensure_future(self._load(sale_id))
        self._refreshing[sale_id] = task
        task.add_done_callback(lambda _: self._refreshing.pop(sale_id, None))
        try:
            return await asyncio.shield(task)
        except psycopg.OperationalError:
            if hit is None or fresh or now - hit[0] > STALE_S:
                raise
            # PostgreSQL away: the terms as last read (the writer decides; these only answer
            # early), asked for again in a second rather than by every request.
            self._retry_at[sale_id] = time.monotonic() + 1.0
            return hit[1]

    async def _load(self, sale_id: str) -> dict[str, SkuTerms]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(_SALE_SQL, (sale_id,))
            rows = await cur.fetchall()
        skus = {r[1]: SkuTerms(*r) for r in rows}
        if len(self._sales) > 10_000:
            self._sales.clear()
        if skus:
            self._sales[sale_id] = (time.monotonic(), skus)
        return skus

    async def projected_intent(self, intent_id: str) -> tuple[str, str, int] | None:
        """(user_id, sku, quantity) of an intent the projection holds, else None."""
        sql = "SELECT user_id, sku, quantity FROM intent_outcomes WHERE intent_id = %s"
        async with self.pool.connection() as conn:
            row = await (await conn.execute(sql, (intent_id,))).fetchone()
        return (row[0], row[1], row[2]) if row else None

    async def intent_status(self, intent_id: str) -> dict[str, Any] | None:
        """The decided intent with its outcome, or None until the projection has it."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_OUTCOME_SQL, (intent_id,))
            row = await cur.fetchone()
        return dict(row) if row else None

    async def ping(self) -> bool:
        """True when a pooled connection answers."""
        async with self.pool.connection(timeout=2.0) as conn:
            await conn.execute("SELECT 1")
        return True


def status_of(row: dict[str, Any]) -> dict[str, Any]:
    """The public status of an intent row (as from ``intent_status``)."""
    outcome = row.get("outcome")
    decided: datetime | None = row.get("decided_at")
    return {
        "intent_id": row["intent_id"],
        "sale_id": row["sale_id"],
        "sku": row["sku"],
        "quantity": row["quantity"],
        "status": outcome or "queued",
        "position": None,
        "order_id": row.get("order_id"),
        "reason": row.get("reason"),
        "detail": row.get("detail") or None,
        "decided_at": decided.isoformat() if decided else None,
        "draw_rank": row.get("draw_rank"),
        "draw_size": row.get("draw_size"),
    }
