"""``flashsale_http`` in `flashsale bench --only compare`: intents POSTed through nginx and the
two app servers, decided by the writer and projected into PostgreSQL, on the stack the bench
started (producers/http/bench.py's tools).

* decisions/s: wrk at full speed for a while, then until the last of its intents is an order
  in PostgreSQL (accept-heavy: every intent is accepted); the intents written over that whole
  span. One hot SKU, then 1,000 SKUs (the requests take them in turn). CPU: every server
  process (nginx, app servers, broker, writer, projector, PostgreSQL) over the same span, per
  1,000 decisions; wrk's own apart.
* latency: open loop at half that rate, each 202 from its scheduled time (the answer a client
  gets: its intent is durably in the log; its decision follows, see ``flashsale_core``).
* oversubscribed: ten intents per unit, two units per user at most, through the same edge;
  what was sold is read back from the topics by the sale audit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg

from flashsale.settings import Settings
from flashsale.topics import TopicNames
from infra.edge import Edge
from infra.processes import PeakMemory


def run(settings: Settings, dsn: str, edge: Edge, seconds: int, latency_seconds: int,
        oversubscribed: int, users: int, skus: int = 1000) -> dict[str, Any]:  # fmt: skip
    """Every figure of the module docstring for this system."""
    from producers.http.auth import load_secret, token
    from producers.http.bench import LogProbe, groups_of, max_load, open_sale, per_unit
    from producers.http.bench_tools import CpuMeter, post_script
    from producers.http.config import EdgeSettings

    url = edge.url
    secret = load_secret(edge.settings.state_dir, EdgeSettings.from_env().jwt_secret).secret
    tokens = [token(f"cmp-{i}", "shopper", 3600, secret) for i in range(users)]
    sale = f"cmp-{uuid.uuid4().hex[:8]}"
    open_sale(url, secret, sale)
    groups = groups_of(settings, edge)
    servers = {k: v for k, v in groups.items() if k != "load_generator"}

    def server_pids() -> list[int]:  # PostgreSQL's backends come and go
        return [p for pids in groups_of(settings, edge).values() for p in pids]

    def decided_and_projected(script: str, sale: str, memory: PeakMemory) -> dict[str, Any]:
        """wrk with ``script`` for ``seconds``, then until its last intent is an order."""
        log = LogProbe(settings)
        try:
            before = log.snapshot()
            meter = CpuMeter(servers)
            meter.start()
            t0 = time.monotonic()
            with memory:
                wrk = max_load(url, script, groups, seconds, 64, log)
                written = log.snapshot()["writer"][0] - before["writer"][0]
                _wait_for_orders(dsn, sale, written, timeout=600)
            span = time.monotonic() - t0
            return {"wrk": wrk, "written": written, "span": span, "cpu": meter.stop()}
        finally:
            log.close()

    memory = PeakMemory(server_pids)
    hot = decided_and_projected(post_script(tokens, f"/v1/sales/{sale}/intents"), sale, memory)
    many_sale = f"cmp-many-{uuid.uuid4().hex[:8]}"
    _open_many(settings, dsn, many_sale, skus)
    many = decided_and_projected(
        post_script(tokens, f"/v1/sales/{many_sale}/intents", "m", skus), many_sale,
        PeakMemory(server_pids),
    )  # fmt: skip
    wrk, written, span, cpu = hot["wrk"], hot["written"], hot["span"], hot["cpu"]
    rate = written / span
    half = max(50, int(rate / 2))
    latency = _latency(settings, url, sale, tokens, half, latency_seconds)
    correctness = _oversubscribed(settings, url, secret, oversubscribed)
    cpu_us = per_unit(cpu, rate)
    return {
        "decisions_per_s": round(rate),
        "decisions_per_s_1000_skus": round(many["written"] / many["span"]),
        "decisions": written,
        "seconds_to_last_order": round(span, 2),
        "accepted_202_per_s_during_wrk": wrk["accepted_2xx_per_s"],
        "cpu_ms_per_1000": round(cpu_us["total"], 1) if cpu_us else None,
        "cpu_us_per_decision_by_process": cpu_us,
        "client_cpu_ms_per_1000": round(
            wrk["cpu_share"]["load_generator"] * seconds / written * 1e6, 1
        )
        if written
        else None,
        "peak_pss_mb": memory.peak_mb,
        "latency_offered_per_s": half,
        **latency["decision"],
        "answer_202": latency["answer_202"],
        "oversold": correctness["oversold"],
        "oversubscribed": correctness,
    }


def _latency(settings: Settings, url: str, sale: str, tokens: list[str], rate: int,
             seconds: int) -> dict[str, Any]:  # fmt: skip
    """Open loop at ``rate``: each intent's decision, as a read_committed consumer of the
    decisions topic sees it, from the time its POST was scheduled (comparable with the
    baselines, whose answer is the decision); and each 202 (queued) from the same time."""
    from flashsale.writer_bench import DecisionReader
    from producers import load

    reader = DecisionReader(settings.kafka_bootstrap, TopicNames.of(settings).decisions,
                            from_end=True)  # fmt: skip
    try:
        with reader.following():
            plan = load.Plan.make(1, rate, seconds, 0, len(tokens), ["b1"], "uniform")
            tally = load.Tally()
            cpu0, t0 = time.process_time(), time.perf_counter()
            asyncio.run(load.http_run(url, f"/v1/sales/{sale}/intents", tokens, plan, tally))
            answered = load.summary(plan, tally, time.perf_counter() - t0,
                                    time.process_time() - cpu0, "202")  # fmt: skip
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(
                i not in reader.seen_ms for i in tally.scheduled_ms
            ):
                time.sleep(0.1)
    finally:
        reader.close()
    lat = [(reader.seen_ms[i] - at) / 1000 for i, at in tally.scheduled_ms.items()
           if i in reader.seen_ms]  # fmt: skip
    undecided = len(tally.scheduled_ms) - len(lat)
    return {
        "decision": {**load.percentiles(lat), "undecided_after_120_s": undecided},
        "answer_202": answered,
    }


def _open_many(settings: Settings, dsn: str, sale: str, skus: int) -> None:
    """A sale of ``skus`` SKUs ``m0`` .. (the admin API takes 100 a sale: this writes the
    OpenSale commands itself), waited for until projected and seen by the edge's feed."""
    from producers.commands import CommandProducer, SkuAllocation

    producer = CommandProducer(settings.kafka_bootstrap, "bench",
                               topic=TopicNames.of(settings).sku_commands)  # fmt: skip
    try:
        now = int(time.time() * 1000)
        allocations = [SkuAllocation(f"m{i}", 2_000_000_000, 2_000_000_000, 1)
                       for i in range(skus)]  # fmt: skip
        producer.open_sale(sale, allocations, now - 1000, now + 3_600_000)
    finally:
        producer.close()
    _wait_for_rows(dsn, "sales", sale, skus, timeout=300)
    time.sleep(1)  # the app servers' feeds read the same facts as the projector


def _wait_for_orders(dsn: str, sale: str, n: int, timeout: float) -> None:
    """Until the projector has written ``n`` orders of ``sale`` (each decided, projected)."""
    _wait_for_rows(dsn, "orders", sale, n, timeout)


def _wait_for_rows(dsn: str, table: str, sale: str, n: int, timeout: float) -> None:
    """Until ``table`` (sales or orders) has ``n`` rows of ``sale``."""
    query = f"SELECT count(*) FROM {table} WHERE sale_id = %s"
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(query, (sale,)).fetchone()
            if row and row[0] >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {row and row[0]} of {n} {table} of {sale} in {timeout} s")
            time.sleep(0.1)


def _wait_for_writer(settings: Settings, timeout: float) -> None:
    """Until the writer has decided every intent in the command topic."""
    from producers.http.bench import LogProbe

    log = LogProbe(settings)
    try:
        deadline = time.monotonic() + timeout
        while (lag := _lag(log)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if lag:
            raise RuntimeError(f"the writer is still {lag} intents behind after {timeout} s")
    finally:
        log.close()


def _lag(log: Any) -> int:
    ends, committed = log.snapshot()["writer"]
    return int(ends - committed)


def _oversubscribed(settings: Settings, url: str, secret: str, intents: int) -> dict[str, Any]:
    """Ten intents per unit, two units per user, open loop; sold as the topics say."""
    from flashsale.sale_audit import audit_sale
    from producers import load
    from producers.http.auth import token
    from producers.http.bench import open_sale

    allocation = max(1, intents // 10)
    sale = f"cmp-over-{uuid.uuid4().hex[:8]}"
    open_sale(url, secret, sale, allocation=allocation, per_user=2)
    users = max(1, intents // 4)
    tokens = [token(f"cmp-over-{i}", "shopper", 3600, secret) for i in range(users)]
    plan = load.Plan.make(11, 2000, intents / 2000, 0, users, ["b1"])
    tally = load.Tally()
    asyncio.run(load.http_run(url, f"/v1/sales/{sale}/intents", tokens, plan, tally))
    _wait_for_writer(settings, timeout=300)
    audit = audit_sale(settings.kafka_bootstrap, TopicNames.of(settings), sale)
    sold = sum(s.units_sold for s in audit.skus.values())
    return {
        "units_sold": sold,
        "allocation": allocation,
        "oversold": max(0, sold - allocation),
        "users_over_limit": sum(1 for v in audit.violations if v.kind == "user-limit"),
        "intents_answered_202": tally.outcomes["202"],
        "edge_answers": dict(tally.outcomes),  # e.g. 409 sold_out once the feed shows none left
        "decisions": audit.decisions,
        "audit": "pass" if audit.passed else "fail",
    }
