"""The analytics projection: per sale, SKU and second, what arrived and what was decided.

It runs on the shared ``ProjectionRunner`` (projections/runner.py) like the outcomes
projection: PostgreSQL holds its position, each batch's rows and tracking offsets commit in
one transaction, so ``flashsale replay`` rebuilds it from offset 0 and compares. It reads the
command topic (intents received, per person) and the decision topic (everything decided);
rows come from ``projections.analytics_rows``.

The ``flashsale analytics`` service also exports the projected totals as Prometheus metrics
(``flashsale_sale_*``, read from PostgreSQL at scrape time, cached a second) with its own
runner counters and consumer lag. What never reaches the log (429s, retries answered from
the edge's cache, rejected bodies) is in the app servers' own metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flashsale import logs
from flashsale.service_metrics import ServiceMetrics
from flashsale.settings import Settings
from flashsale.topics import TopicNames
from infra.signals import stop_on_signals
from projections.analytics_rows import COUNTS, LATENCY_BUCKETS_MS, AnalyticsRows
from projections.runner import Decoded, ProjectionRunner, use_short_switch_interval
from projections.store import jsonb_sum
from schemas.codec import SchemaRegistry, default_registry

log = structlog.get_logger(__name__)

TABLES = ("analytics_seconds", "analytics_users")
"""The tables the projection writes (what a replay compares)."""
WANTED_COMMANDS = ("PurchaseIntent",)
"""The only command it reads: the others are passed over undecoded."""

_SECONDS_COLUMNS = (
    "sale_id, sku, at, " + ", ".join(COUNTS) + ", rejected_by_reason, latency_ms, remaining,"
    " remaining_sequence"
)
_ADDED = ",\n    ".join(f"{c} = a.{c} + excluded.{c}" for c in COUNTS)
_SECONDS_SQL = f"""
INSERT INTO analytics_seconds AS a ({_SECONDS_COLUMNS})
SELECT s, k, at, {", ".join(COUNTS)}, r::jsonb, l::bigint[], rem, rseq
FROM unnest(%s::text[], %s::text[], %s::timestamptz[],
            {", ".join(["%s::bigint[]"] * len(COUNTS))},
            %s::text[], %s::text[], %s::int[], %s::bigint[])
     AS t(s, k, at, {", ".join(COUNTS)}, r, l, rem, rseq)
ON CONFLICT (sale_id, sku, at) DO UPDATE SET
    {_ADDED},
    rejected_by_reason = {jsonb_sum("a.rejected_by_reason", "excluded.rejected_by_reason")},
    latency_ms = ARRAY(SELECT x + y FROM unnest(a.latency_ms, excluded.latency_ms)
                       WITH ORDINALITY AS b(x, y, i) ORDER BY i),
    remaining = CASE WHEN excluded.remaining_sequence > a.remaining_sequence
                     THEN excluded.remaining ELSE a.remaining END,
    remaining_sequence = greatest(a.remaining_sequence, excluded.remaining_sequence)
"""
_USERS_SQL = """
INSERT INTO analytics_users AS u (sale_id, user_id, intents)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])
ON CONFLICT (sale_id, user_id) DO UPDATE SET intents = u.intents + excluded.intents
"""


class AnalyticsProjection:
    """Per-second aggregates and intents per person: a rows + store pair for the runner."""

    def __init__(self, name: str, names: TopicNames, registry: SchemaRegistry) -> None:
        self.name = name
        self.topics: tuple[str, ...] = (names.sku_commands, names.decisions)
        commands = set(registry.names()) - set(WANTED_COMMANDS)
        self.passes_over: frozenset[bytes] = frozenset(
            registry.fingerprint(n) for n in commands if "sequence" not in _fields(registry, n)
        )

    def rows(self, records: Sequence[Decoded]) -> AnalyticsRows:
        """The batch's aggregates."""
        rows = AnalyticsRows()
        for r in records:
            rows.add(r.name, r.record, r.timestamp)
        return rows

    def write(self, conn: psycopg.Connection, rows: AnalyticsRows) -> int:
        """Add the batch's aggregates to the stored ones."""
        with conn.cursor() as cur:
            if rows.seconds:
                cur.execute(_SECONDS_SQL, rows.seconds_columns())
            if rows.users:
                cur.execute(_USERS_SQL, rows.users_columns())
        return len(rows)


def _fields(registry: SchemaRegistry, name: str) -> set[str]:
    return {f["name"] for f in registry.schema(name)["fields"]}


def live_name(settings: Settings) -> str:
    """The tracking name of the namespace's running analytics projection."""
    ns = settings.namespace
    return "analytics" if ns == "flashsale" else f"{ns}-analytics"


def runner(
    settings: Settings,
    dsn: str,
    *,
    name: str,
    group_id: str,
    search_path: str | None = None,
    batch_size: int = 2000,
    registry: SchemaRegistry | None = None,
) -> ProjectionRunner:
    """The analytics projection on the shared runner."""
    registry = registry or default_registry()
    projection = AnalyticsProjection(name, TopicNames.of(settings), registry)
    return ProjectionRunner(settings.kafka_bootstrap, dsn, projection, group_id=group_id,
                            batch_size=batch_size, registry=registry,
                            search_path=search_path)  # fmt: skip


_RECENT = (
    "sale_id IN (SELECT sale_id FROM analytics_seconds WHERE at > now() - %s * interval '1 s')"
)
_TOTALS_SQL = f"""
SELECT sale_id, sku, {", ".join(f"sum({c})::bigint" for c in COUNTS)},
       (array_agg(remaining ORDER BY remaining_sequence DESC)
            FILTER (WHERE remaining IS NOT NULL))[1]
FROM analytics_seconds WHERE {_RECENT} GROUP BY sale_id, sku
"""
_LATENCY_SQL = f"""
SELECT sale_id, sku, i, sum(x)::bigint
FROM analytics_seconds, unnest(latency_ms) WITH ORDINALITY AS u(x, i)
WHERE {_RECENT} GROUP BY sale_id, sku, i
"""

_REASONS_SQL = f"""
SELECT sale_id, sku, key, sum(value::bigint)::bigint
FROM analytics_seconds, jsonb_each_text(rejected_by_reason)
WHERE {_RECENT} GROUP BY sale_id, sku, key
"""
# People per sale, and how many sent 1, 2, 3, 4, 5-9, 10+ intents (the bots' signature).
_PEOPLE_SQL = f"""
SELECT sale_id, CASE WHEN intents >= 10 THEN '10+' WHEN intents >= 5 THEN '5-9'
                     ELSE intents::text END, count(*)
FROM analytics_users WHERE {_RECENT} GROUP BY 1, 2
"""


class SaleTotalsCollector(Collector):
    """The projected totals of recent sales as Prometheus metrics (read at scrape time)."""

    def __init__(self, dsn: str, recent_s: int = 3600) -> None:
        self.dsn, self.recent_s = dsn, recent_s
        self._lock = threading.Lock()
        self._cached: tuple[float, _Read] = (0.0, _Read([], {}, [], []))

    def _rows(self) -> _Read:
        with self._lock:
            at, read = self._cached
            if time.monotonic() - at >= 1.0:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    args = (self.recent_s,)
                    latency: dict[tuple[str, str], list[int]] = defaultdict(
                        lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1)
                    )
                    for sale, sku, i, n in conn.execute(_LATENCY_SQL, args):
                        latency[(sale, sku)][i - 1] = n
                    read = _Read(conn.execute(_TOTALS_SQL, args).fetchall(), latency,
                                 conn.execute(_REASONS_SQL, args).fetchall(),
                                 conn.execute(_PEOPLE_SQL, args).fetchall())  # fmt: skip
                self._cached = (time.monotonic(), read)
            return read

    def collect(self) -> Iterator[Metric]:
        try:
            read = self._rows()
        except psycopg.Error as exc:
            log.warning("metrics.totals_unavailable", error=str(exc))
            read = _Read([], {}, [], [])
        rows, by_sku = read.totals, read.latency
        labels = ["sale", "sku"]
        counts = {c: CounterMetricFamily(f"flashsale_sale_{c}", f"{c} (log)", labels=labels)
                  for c in COUNTS}  # fmt: skip
        remaining = GaugeMetricFamily("flashsale_sale_remaining", "units left", labels=labels)
        latency = GaugeMetricFamily(
            "flashsale_sale_decision_latency_ms_bucket",
            "answers to intents by latency bucket (le: upper bound in ms, cumulative)",
            labels=[*labels, "le"],
        )
        for row in rows:
            sale, sku = row[0], row[1]
            for c, value in zip(COUNTS, row[2 : 2 + len(COUNTS)], strict=True):
                counts[c].add_metric([sale, sku], value)
            if row[-1] is not None:
                remaining.add_metric([sale, sku], row[-1])
            total = 0
            buckets = by_sku.get((sale, sku), ())
            for bound, n in zip((*LATENCY_BUCKETS_MS, "+Inf"), buckets, strict=False):
                total += n
                latency.add_metric([sale, sku, str(bound)], total)
        reasons = CounterMetricFamily("flashsale_sale_rejected_by_reason",
                                      "intents rejected, by reason (log)",
                                      labels=[*labels, "reason"])  # fmt: skip
        for sale, sku, reason, n in read.reasons:
            reasons.add_metric([sale, sku, reason], n)
        people = GaugeMetricFamily("flashsale_sale_people",
                                   "people who sent this many intents to the sale (log)",
                                   labels=["sale", "intents"])  # fmt: skip
        for sale, intents, n in read.people:
            people.add_metric([sale, intents], n)
        yield from counts.values()
        yield remaining
        yield latency
        yield reasons
        yield people


@dataclasses.dataclass(frozen=True)
class _Read:
    """One scrape's rows, cached a second."""

    totals: list[tuple[Any, ...]]
    latency: dict[tuple[str, str], list[int]]
    reasons: list[tuple[Any, ...]]
    people: list[tuple[Any, ...]]


def main(settings: Settings, *, batch_size: int = 2000) -> None:
    """Composition root: run the namespace's analytics projection until SIGTERM/SIGINT."""
    logs.configure(service="analytics")
    use_short_switch_interval()
    name = live_name(settings)
    group = f"{settings.namespace}-analytics"
    projector = runner(settings, settings.database_url, name=name, group_id=group,
                       batch_size=batch_size)  # fmt: skip
    metrics = ServiceMetrics(settings, "analytics")
    metrics.stats(projector.stats)
    metrics.lag(settings.kafka_bootstrap, group, projector.topics)
    metrics.registry.register(SaleTotalsCollector(settings.database_url))
    stop = stop_on_signals(log, "analytics.signal")
    with metrics.serving():
        projector.run(stop)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale analytics`."""
    p = sub.add_parser("analytics", help="project per-second sale analytics until stopped")
    p.add_argument("--batch-size", type=int, default=2000)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the analytics projection against the stack's servers."""
    from infra.stack import Stack

    ep = Stack(settings).endpoints()
    resolved = dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap, database_url=ep.dsn)
    main(resolved, batch_size=args.batch_size)
    return 0
