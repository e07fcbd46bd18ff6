"""`flashsale top`: the namespace's services and sales, live in the terminal.

Every refresh scrapes each service's ``/metrics`` (the ports in the run directory's metric
cards, ``flashsale.service_metrics``), every app server's (``run/<ns>/http/app-<port>.pid``)
and the supervisor's ``supervisor.prom``, and shows per process: CPU (% of one core, from
``process_cpu_seconds_total`` between two scrapes), resident memory, open files, its work per
second, consumer lag, dead letters and restarts; per app server its requests, 202s, 429s,
503s and repeats per second with latency percentiles; then per sale and SKU the analytics
service's totals.
``--once`` prints one table (two scrapes a second apart) and exits.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from flashsale.scrape import WORK, Scrape, quantile_between, rate, scrape, targets
from flashsale.settings import Settings
from projections.analytics_rows import LATENCY_BUCKETS_MS, percentile


def _restarts(settings: Settings) -> dict[str, float]:
    prom = settings.state_dir / "run" / settings.namespace / "supervisor.prom"
    try:
        text = Path(prom).read_text()
    except OSError:
        return {}
    return {
        s.labels["service"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "flashsale_service_restarts_total"
    }


def services_table(
    now: list[Scrape], before: dict[str, Scrape], restarts: dict[str, float]
) -> Table:
    """One row per process."""
    table = Table(title="services", expand=True)
    for col in ("service", "pid", "cpu %", "rss MB", "files", "work/s", "lag", "dead letters",
                "restarts"):  # fmt: skip
        table.add_column(col, justify="left" if col == "service" else "right")
    for s in now:
        if s.error:
            table.add_row(s.name, str(s.pid), "-", "-", "-", f"[red]{s.error[:30]}", "-", "-", "-")
            continue
        prev = before.get(s.key)
        cpu = rate(s, prev, "process_cpu_seconds_total")
        metric, unit = WORK.get(s.kind, ("", ""))
        work = rate(s, prev, metric) if metric else None
        lag = s.value("flashsale_consumer_lag")
        has_lag = any(n == "flashsale_consumer_lag" for n, _ in s.samples)
        dead = f"flashsale_{s.kind}_dead_letters_total"
        has_dead = any(n == dead for n, _ in s.samples)
        table.add_row(
            s.name,
            str(s.pid),
            "…" if cpu is None else f"{cpu * 100:.0f}",
            f"{s.value('process_resident_memory_bytes') / 2**20:.0f}",
            f"{s.value('process_open_fds'):.0f}",
            "…" if work is None else f"{work:,.0f} {unit}",
            f"{lag:,.0f}" if has_lag else "-",
            f"{s.value(dead):,.0f}" if has_dead else "-",
            f"{restarts.get(s.name, 0):.0f}" if s.name in restarts else "-",
        )
    return table


def edge_table(now: list[Scrape], before: dict[str, Scrape]) -> Table:
    """One row per app server: requests and answers per second, latency since the last
    refresh (request to its last byte, and an intent's produce to Kafka's ack)."""
    table = Table(title="edge (app servers)", expand=True)
    for col in ("server", "req/s", "202/s", "429/s", "503/s", "repeats/s", "p50 ms", "p99 ms",
                "ack p99 ms"):  # fmt: skip
        table.add_column(col, justify="left" if col == "server" else "right")
    for s in now:
        if s.kind != "app" or s.error:
            continue
        prev = before.get(s.key)
        per_s = [rate(s, prev, m) for m in (
            "flashsale_http_requests_total", "flashsale_intents_accepted_total",
            "flashsale_http_rate_limited_total", "flashsale_http_unavailable_total",
            "flashsale_http_intent_repeats_total")]  # fmt: skip
        ms = [quantile_between(s, prev, m, q) for m, q in (
            ("flashsale_http_request_duration_seconds", 0.5),
            ("flashsale_http_request_duration_seconds", 0.99),
            ("flashsale_http_kafka_ack_seconds", 0.99))]  # fmt: skip
        table.add_row(s.name, *("…" if v is None else _rate(v) for v in per_s),
                      *("-" if v is None else _bound_ms(v) for v in ms))  # fmt: skip
    return table


def _rate(v: float) -> str:
    """Per second: a decimal below 10 (2.5/s is not 2, 0.3/s is not 0)."""
    return f"{v:,.1f}" if v < 10 else f"{v:,.0f}"


def _bound_ms(seconds: float) -> str:
    """A histogram bucket's upper bound; the last bucket has none."""
    return "> top bucket" if seconds == float("inf") else f"≤{seconds * 1000:,.1f}"


def sales_table(analytics: Scrape | None) -> Table:
    """One row per sale and SKU: the analytics service's totals."""
    table = Table(title="sales (analytics projection)", expand=True)
    for col in ("sale", "sku", "received", "accepted", "rejected", "queued", "held", "paid",
                "remaining", "p50 ms", "p99 ms"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("sale", "sku") else "right")
    if analytics is None or analytics.error:
        return table
    rows: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    buckets: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (name, labels), value in analytics.samples.items():
        ls = dict(labels)
        if "sku" not in ls or "reason" in ls:  # per SKU only (not by reason, not people)
            continue
        key = (ls["sale"], ls["sku"])
        if name == "flashsale_sale_decision_latency_ms_bucket":
            buckets[key][ls["le"]] = value
        elif name.startswith("flashsale_sale_"):
            rows[key][name.removeprefix("flashsale_sale_").removesuffix("_total")] = value
    for key in sorted(rows):
        r = rows[key]
        cumulative = [buckets[key].get(str(b), 0.0) for b in (*LATENCY_BUCKETS_MS, "+Inf")]
        counts = [int(c - p) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
        p50, p99 = percentile(counts, 0.5), percentile(counts, 0.99)
        table.add_row(
            *key,
            *(f"{r.get(c, 0):,.0f}" for c in ("received", "accepted", "rejected", "queued",
                                                "held", "paid")),
            f"{r['remaining']:,.0f}" if "remaining" in r else "-",
            "-" if p50 is None else f"{p50:,.1f}",
            "-" if p99 is None else f"{p99:,.1f}",
        )  # fmt: skip
    return table


def snapshot(settings: Settings, before: dict[str, Scrape]) -> tuple[Group, dict[str, Scrape]]:
    """Scrape everything once; the view and the scrapes (the next refresh's ``before``)."""
    now = [scrape(t) for t in targets(settings)]
    analytics = next((s for s in now if s.kind == "analytics"), None)
    view = Group(services_table(now, before, _restarts(settings)), edge_table(now, before),
                 sales_table(analytics))  # fmt: skip
    return view, {s.key: s for s in now}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale top`."""
    p = sub.add_parser("top", help="the namespace's services and sales, live")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Refresh until Ctrl-C (or once)."""
    console = Console()
    _, before = snapshot(settings, {})
    if not before:
        console.print(f"no service of namespace {settings.namespace} serves /metrics: "
                      "start them with `make up` (or run `make demo`)")  # fmt: skip
        return 1
    time.sleep(min(args.interval, 1.0))
    view, before = snapshot(settings, before)
    if args.once:
        console.print(view)
        return 0
    with Live(view, console=console, screen=False, auto_refresh=False) as live:
        while True:
            time.sleep(args.interval)
            view, before = snapshot(settings, before)
            live.update(view, refresh=True)
