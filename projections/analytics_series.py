"""A sale's analytics as time series: what the live page charts and the report draws.

``SERIES_SQL`` reads one sale's ``analytics_seconds`` rows (a query any reader can run, sync
or async); ``series`` turns them into per-second arrays over one time axis. Seconds the
projection has no row for are zeros (nothing happened), stock carries forward.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from projections.analytics_rows import LATENCY_BUCKETS_MS, percentile

SERIES_SQL = """
SELECT sku, extract(epoch FROM at)::bigint, received, accepted, rejected, queued, deferred,
       waitlisted, held, paid, expired, latency_ms, remaining, queue_length, rejected_by_reason
FROM analytics_seconds WHERE sale_id = %s AND at >= to_timestamp(%s) ORDER BY at, sku
"""
"""Parameters: sale id, first second (epoch seconds; 0 for all)."""

ALLOCATION_SQL = "SELECT sku, allocation FROM sales WHERE sale_id = %s ORDER BY sku"

MAX_SECONDS = 3600
"""At most this many seconds are charted (the last ones): the page stays light."""


def _decided(row: Sequence[Any]) -> int:
    """Intent answers in a row: accepted, rejected, queued, deferred, waitlisted."""
    return int(sum(row[3:8]))


def series(
    sale_id: str, rows: Sequence[Sequence[Any]], allocation: dict[str, int]
) -> dict[str, Any]:
    """The sale's per-second series and totals from its ``SERIES_SQL`` rows."""
    skus = sorted({r[0] for r in rows} | set(allocation))
    if not rows:
        return {
            "sale_id": sale_id,
            "skus": skus,
            "t": [],
            "totals": _totals(rows, skus, allocation),
        }
    first, last = rows[0][1], rows[-1][1]
    first = max(first, last - MAX_SECONDS + 1)
    t = list(range(first, last + 1))
    at = {s: i for i, s in enumerate(t)}
    n = len(t)
    received, decided, accepted, rejected = [0] * n, [0] * n, [0] * n, [0] * n
    buckets = [[0] * (len(LATENCY_BUCKETS_MS) + 1) for _ in range(n)]
    remaining: dict[str, list[int | None]] = {k: [None] * n for k in skus}
    queue = [0] * n
    for r in rows:
        i = at.get(r[1])
        if i is None:
            continue  # before the charted window
        received[i] += r[2]
        decided[i] += _decided(r)
        accepted[i] += r[3]
        rejected[i] += r[4]
        buckets[i] = [a + b for a, b in zip(buckets[i], r[11], strict=True)]
        if r[12] is not None:
            remaining[r[0]][i] = r[12]
        queue[i] = max(queue[i], r[13])
    for sku, values in remaining.items():  # stock carries forward between facts
        last_seen = allocation.get(sku)
        for i, v in enumerate(values):
            last_seen = v if v is not None else last_seen
            values[i] = last_seen
    return {
        "sale_id": sale_id,
        "skus": skus,
        "t": t,
        "received": received,
        "decided": decided,
        "accepted": accepted,
        "rejected": rejected,
        "p50_ms": [percentile(b, 0.5) for b in buckets],
        "p99_ms": [percentile(b, 0.99) for b in buckets],
        "remaining": remaining,
        "queue_length": queue,
        "totals": _totals(rows, skus, allocation),
    }


def _totals(
    rows: Sequence[Sequence[Any]], skus: Sequence[str], allocation: dict[str, int]
) -> dict[str, Any]:
    """Per SKU and overall: counts, rejections by reason, latency percentiles, stock."""
    names = ("received", "accepted", "rejected", "queued", "deferred", "waitlisted", "held",
             "paid", "expired")  # fmt: skip
    per: dict[str, dict[str, Any]] = {}
    for sku in skus:
        mine = [r for r in rows if r[0] == sku]
        counts = {name: int(sum(r[2 + i] for r in mine)) for i, name in enumerate(names)}
        reasons: Counter[str] = Counter()
        merged = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for r in mine:
            reasons.update(r[14])
            merged = [a + b for a, b in zip(merged, r[11], strict=True)]
        last = max(mine, key=lambda r: r[1], default=None)
        per[sku] = {
            **counts,
            "decided": int(sum(_decided(r) for r in mine)),
            "rejected_by_reason": dict(sorted(reasons.items())),
            "allocation": allocation.get(sku),
            "remaining": _last_remaining(mine, allocation.get(sku))
            if last
            else allocation.get(sku),
            "latency_ms": {f"p{q}": percentile(merged, q / 100) for q in (50, 90, 99)},
            "latency_buckets": merged,
        }
    return per


def _last_remaining(rows: Sequence[Sequence[Any]], default: int | None) -> int | None:
    for r in reversed(rows):
        if r[12] is not None:
            return int(r[12])
    return default
