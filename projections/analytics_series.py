"""A sale's analytics as time series: what the live page charts and the report draws.

PostgreSQL adds the rows up (per second across SKUs, per SKU over the whole sale), so a
reader gets at most ``MAX_SECONDS`` points whatever the sale's size; ``read_series`` and
``read_series_async`` run the same queries (``first_queries``, then ``window_queries``) and
``assemble`` (pure) turns their rows into arrays over one time axis. Seconds the projection
has no row for are zeros (nothing happened); stock carries forward from the last known.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import psycopg

from projections.analytics_rows import LATENCY_BUCKETS_MS, percentile

MAX_SECONDS = 3600
"""At most this many seconds are charted (the sale's last ones)."""
STOCK_SKUS = 8
"""Stock is charted for at most this many SKUs (the first by name); the table has them all."""

Query = tuple[str, str, tuple[Any, ...]]
Rows = dict[str, list[tuple[Any, ...]]]
_LATENCY = "unnest(latency_ms) WITH ORDINALITY AS u(x, i)"
_TOTALS = ("received", "accepted", "rejected", "queued", "drawn", "deferred", "waitlisted",
           "held", "paid", "expired")  # fmt: skip


def first_queries(sale_id: str) -> list[Query]:
    """The sale's terms and time span."""
    return [
        ("allocation", "SELECT sku, allocation FROM sales WHERE sale_id = %s", (sale_id,)),
        ("span", "SELECT extract(epoch FROM min(at))::bigint, extract(epoch FROM max(at))::bigint"
                 " FROM analytics_seconds WHERE sale_id = %s", (sale_id,)),
    ]  # fmt: skip


def window_queries(sale_id: str, since: int, skus: Sequence[str]) -> list[Query]:
    """Per second from ``since`` (epoch s) across SKUs, stock of ``skus``, totals per SKU."""
    at = "extract(epoch FROM at)::bigint"
    where = "sale_id = %s AND at >= to_timestamp(%s)"
    totals = ", ".join(f"sum({c})::bigint" for c in _TOTALS)
    return [
        ("seconds", f"SELECT {at}, sum(received)::bigint, sum(accepted)::bigint,"
                    " sum(rejected)::bigint, sum(queued)::bigint, sum(drawn)::bigint"
                    f" FROM analytics_seconds WHERE {where} GROUP BY at", (sale_id, since)),
        ("latency", f"SELECT {at}, i, sum(x)::bigint FROM analytics_seconds, {_LATENCY}"
                    f" WHERE {where} GROUP BY at, i", (sale_id, since)),
        ("stock", f"SELECT sku, {at}, remaining FROM analytics_seconds WHERE {where}"
                  " AND sku = ANY(%s) AND remaining IS NOT NULL", (sale_id, since, list(skus))),
        ("stock_before", "SELECT DISTINCT ON (sku) sku, remaining FROM analytics_seconds"
                         " WHERE sale_id = %s AND at < to_timestamp(%s) AND sku = ANY(%s)"
                         " AND remaining IS NOT NULL ORDER BY sku, remaining_sequence DESC",
         (sale_id, since, list(skus))),
        ("totals", f"SELECT sku, {totals}, (array_agg(remaining ORDER BY remaining_sequence DESC)"
                   " FILTER (WHERE remaining IS NOT NULL))[1]"
                   " FROM analytics_seconds WHERE sale_id = %s GROUP BY sku", (sale_id,)),
        ("reasons", "SELECT sku, key, sum(value::bigint)::bigint FROM analytics_seconds,"
                    " jsonb_each_text(rejected_by_reason) WHERE sale_id = %s GROUP BY sku, key",
         (sale_id,)),
        ("latency_totals", f"SELECT sku, i, sum(x)::bigint FROM analytics_seconds, {_LATENCY}"
                           " WHERE sale_id = %s GROUP BY sku, i", (sale_id,)),
    ]  # fmt: skip


def _window(first: Rows) -> tuple[dict[str, int], int | None, int | None, list[str]]:
    allocation = {k: int(v) for k, v in first["allocation"]}
    low, high = first["span"][0] if first["span"] else (None, None)
    since = None if high is None else max(low, high - MAX_SECONDS + 1)
    return allocation, since, high, sorted(allocation)[:STOCK_SKUS]


def read_series(conn: psycopg.Connection[Any], sale_id: str) -> dict[str, Any] | None:
    """The sale's series (None when nothing is known of it), on a sync connection."""
    first = {n: conn.execute(q, p).fetchall() for n, q, p in first_queries(sale_id)}
    allocation, since, last, skus = _window(first)
    if last is None and not allocation:
        return None
    queries = window_queries(sale_id, since or 0, skus)
    rows = {n: conn.execute(q, p).fetchall() for n, q, p in queries}
    return assemble(sale_id, allocation, since, last, skus, rows)


async def read_series_async(
    conn: psycopg.AsyncConnection[Any], sale_id: str
) -> dict[str, Any] | None:
    """``read_series`` on an async connection."""
    first = {n: await (await conn.execute(q, p)).fetchall() for n, q, p in first_queries(sale_id)}
    allocation, since, last, skus = _window(first)
    if last is None and not allocation:
        return None
    rows = {}
    for n, q, p in window_queries(sale_id, since or 0, skus):
        rows[n] = await (await conn.execute(q, p)).fetchall()
    return assemble(sale_id, allocation, since, last, skus, rows)


def assemble(
    sale_id: str,
    allocation: dict[str, int],
    since: int | None,
    last: int | None,
    stock_skus: Sequence[str],
    rows: Rows,
) -> dict[str, Any]:
    """The series from the window queries' rows (pure)."""
    t = [] if since is None or last is None else list(range(since, last + 1))
    n, at = len(t), {s: i for i, s in enumerate(t)}
    received, decided, accepted, rejected = [0] * n, [0] * n, [0] * n, [0] * n
    queued, drawn = [0] * n, [0] * n
    # Rows projected after the span was read (a live sale) lie past ``last``: left out.
    for second, rec, acc, rej, que, drw in rows["seconds"]:
        if (i := at.get(second)) is not None:
            received[i], accepted[i], rejected[i] = rec, acc, rej
            decided[i], queued[i], drawn[i] = acc + rej, que, drw
    buckets = [[0] * (len(LATENCY_BUCKETS_MS) + 1) for _ in range(n)]
    for second, b, count in rows["latency"]:
        if (i := at.get(second)) is not None:
            buckets[i][b - 1] = count
    before: dict[str, int] = dict(rows["stock_before"])
    remaining: dict[str, list[int | None]] = {k: [None] * n for k in stock_skus}
    for sku, second, left in rows["stock"]:
        if (i := at.get(second)) is not None:
            remaining[sku][i] = left
    for sku, values in remaining.items():  # stock carries forward between facts
        known = before.get(sku, allocation.get(sku))
        for i, v in enumerate(values):
            known = v if v is not None else known
            values[i] = known
    return {
        "sale_id": sale_id,
        "skus": sorted({r[0] for r in rows["totals"]} | set(allocation)),
        "stock_skus": list(stock_skus),
        "t": t,
        "received": received,
        "decided": decided,
        "accepted": accepted,
        "rejected": rejected,
        "queued": _running(queued),
        "drawn": _running(drawn),
        "p50_ms": [percentile(b, 0.5) for b in buckets],
        "p99_ms": [percentile(b, 0.99) for b in buckets],
        "remaining": remaining,
        "totals": _totals(rows, allocation),
    }


def _running(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _totals(rows: Rows, allocation: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per SKU over the whole sale: counts, rejections by reason, latency, stock."""
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for sku, reason, count in rows["reasons"]:
        reasons[sku][reason] += count
    latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    for sku, i, count in rows["latency_totals"]:
        latency[sku][i - 1] = count
    found = {r[0]: r for r in rows["totals"]}
    per = {}
    for sku in sorted(set(found) | set(allocation)):
        r = found.get(sku) or (sku, *([0] * len(_TOTALS)), None)
        counts = {name: int(r[1 + i]) for i, name in enumerate(_TOTALS)}
        left = r[-1] if r[-1] is not None else allocation.get(sku)
        merged = latency[sku]
        per[sku] = {
            **counts,
            "decided": counts["accepted"] + counts["rejected"],
            "rejected_by_reason": dict(sorted(reasons[sku].items())),
            "allocation": allocation.get(sku),
            "remaining": left,
            "latency_ms": {f"p{q}": percentile(merged, q / 100) for q in (50, 90, 99)},
            "latency_buckets": merged,
        }
    return per
