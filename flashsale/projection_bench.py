"""How fast the projection, the audit and the replay read a sale: a `make bench` scenario.

A sale of ``n`` intents over 1,000 SKUs is decided by one worker in a namespace of its own;
then, with the worker stopped, the projection rebuilds it from offset 0 into a scratch
PostgreSQL schema (dropped afterwards), and the audit reads it. Figures: decisions/s from
start to caught up, and CPU µs per decision of the projector process and its PostgreSQL
backend (read from /proc), so both sides of the write show; the same for the analytics
projection over the same log, one after the other; the audit's records/s; and a
`flashsale replay` of the same sale compared with that projection, in offsets/s.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flashsale.replay import replay
from flashsale.sale_audit import audit_sale
from flashsale.settings import Settings
from flashsale.writer_bench import DecisionReader, Namespace
from infra.processes import cpu_seconds
from producers.commands import SkuAllocation
from projections import analytics, schema
from projections.postgres import PostgresProjector
from projections.runner import ProjectionRunner, use_short_switch_interval


def projection(settings: Settings, dsn: str, broker_pid: int | None, n: int) -> dict[str, Any]:
    """Decide an accept-heavy sale of n intents, then project it and audit it from offset 0."""
    use_short_switch_interval()  # as the projector's and the replay's composition roots do
    ns = Namespace(settings, "projection", broker_pid)
    scratch = f"bench_{uuid.uuid4().hex[:8]}"
    sale = "bench"
    try:
        skus = [f"sku-{i:04d}" for i in range(1000)]
        now = int(time.time() * 1000)
        allocations = [SkuAllocation(k, n // 1000 + 1, n, 1) for k in skus]
        ns.producer.open_sale(sale, allocations, now - 1000, now + 3_600_000)
        ns.intents(n, skus, max(1, n // 4))
        reader = DecisionReader(ns.bootstrap, ns.names.decisions)
        ns.start()
        reader.wait(n, 1800)
        reader.close()
        ns.stop()
        schema.create(dsn, scratch)
        runner = PostgresProjector(
            ns.bootstrap,
            dsn,
            name="bench",
            group_id=f"{ns.settings.namespace}-projection",
            topics=ns.names,
            search_path=scratch,
        )
        seconds, cpu, pg_cpu = _caught_up(runner)
        # The analytics projection over the same log (commands and decisions), same schema.
        a_seconds, a_cpu, a_pg = _caught_up(
            analytics.runner(ns.settings, dsn, name="bench-analytics",
                             group_id=f"{ns.settings.namespace}-analytics", search_path=scratch)
        )  # fmt: skip
        audit = audit_sale(ns.bootstrap, ns.names, sale, timeout=1200)
        # The projections above are the "live" ones here: replay again and compare.
        again = replay(ns.settings, dsn, live_schema=scratch, live_projection="bench",
                       live_analytics="bench-analytics", progress=False)  # fmt: skip
        return {
            "intents": n,
            "decisions": reader.count,
            "projection_seconds": round(seconds, 2),
            "projection_decisions_per_s": round(reader.count / seconds),
            "projector_cpu_us_per_decision": round(cpu / reader.count * 1e6, 1),
            "postgres_cpu_us_per_decision": round(pg_cpu / reader.count * 1e6, 1),
            # Reads both topics (each intent and its decision); per decision all the same.
            "analytics_decisions_per_s": round(reader.count / a_seconds),
            "analytics_cpu_us_per_decision": round(a_cpu / reader.count * 1e6, 1),
            "analytics_postgres_cpu_us_per_decision": round(a_pg / reader.count * 1e6, 1),
            "audit": "pass" if audit.passed else "fail",
            "audit_records": audit.records_read,
            "audit_records_per_s": round(audit.records_read / audit.seconds),
            "replay": "same" if again.same else "different",
            "replay_offsets_per_s": again.as_json()["offsets_per_s"],
        }
    finally:
        schema.drop(dsn, scratch)
        ns.drop()


def _caught_up(runner: ProjectionRunner) -> tuple[float, float, float]:
    """Run ``runner`` from offset 0 to the log's end, then close it: seconds, its CPU seconds
    and its PostgreSQL backend's."""
    try:
        pg_pid = runner.backend_pid()
        t0, cpu0, pg0 = time.monotonic(), time.process_time(), cpu_seconds(pg_pid)
        runner.run_until_caught_up(timeout=1800)
        return time.monotonic() - t0, time.process_time() - cpu0, cpu_seconds(pg_pid) - pg0
    finally:
        runner.close()
