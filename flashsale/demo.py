"""`flashsale demo`: a whole flash sale, end to end, checked from the log."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import threading
import time
from typing import Any

import httpx
import psycopg
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flashsale import replay, sale_audit
from flashsale import report as report_mod
from flashsale.audit import DecisionAudit
from flashsale.probe import ProbeResult, run_probe
from flashsale.pseudonyms import KeyStore
from flashsale.settings import Settings
from flashsale.topics import TopicNames
from infra.edge import Edge
from infra.services import all_services
from infra.stack import Stack
from producers.cli import open_sale
from producers.commands import CommandProducer, SkuAllocation
from producers.crowd import plan_crowd
from producers.http.auth import load_secret, token
from producers.http.config import EdgeSettings
from producers.http_crowd import CrowdResult, drive_crowd
from producers.identity import intent_id_for


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `demo` command."""
    p = sub.add_parser("demo", help="run a flash sale end to end and check its invariants")
    # A spike: 50,000 intents from 20,000 people for 6,000 units (thousands of winners).
    p.add_argument("--intents", type=int, default=50_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--skus", type=int, default=3)
    p.add_argument("--allocation", type=int, default=2_000, help="units per SKU")
    p.add_argument("--per-user-limit", type=int, default=2)
    p.add_argument("--report", help="also write the summary as JSON to this file")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for decisions")
    p.add_argument(
        "--direct",
        action="store_true",
        help="write intents with the producer library instead of HTTP via nginx",
    )
    p.add_argument("--no-prequeue", dest="prequeue", action="store_false",
                   help="skip the second sale (a fair pre-queue drawn at the start)")  # fmt: skip
    p.add_argument("--no-holds", dest="holds", action="store_false",
                   help="skip the sales with holds (payments, a waitlist, the operator's "
                        "pause, added units and cancel)")  # fmt: skip
    p.set_defaults(run=run)


def _percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start what is missing, run the sale, print the summary, stop what was started."""
    from projections.runner import use_short_switch_interval

    use_short_switch_interval()  # the demo ends with a replay on the pipelined runner
    stack = Stack(settings)
    started_servers = stack.up()
    services = all_services(settings)
    started = [s for s in services if s.start()]
    edge = Edge(settings)
    edge_started = False
    try:
        if not args.direct:
            edge_started = any(edge.up().values())
        summary = _sale(args, settings, stack, None if args.direct else edge)
        if args.prequeue:
            from flashsale.demo_prequeue import run_prequeue_sale

            summary.update(run_prequeue_sale(settings, stack, None if args.direct else edge))
            summary["invariants_hold"] &= summary["fairness_audit"] == "pass"
        if args.holds:
            from flashsale.demo_orders import run_orders_sale

            summary.update(run_orders_sale(settings, stack, None if args.direct else edge))
            summary["invariants_hold"] &= summary["holds_invariants_hold"]
            from flashsale.demo_operator import run_operator_sale

            summary.update(run_operator_sale(settings, stack, None if args.direct else edge))
            summary["invariants_hold"] &= summary["ops_invariants_hold"]
        summary["reports"] = _write_reports(settings, stack, summary)
    finally:
        if edge_started:
            edge.down()
        for service in reversed(started):
            service.stop()
        if any(started_servers.values()):
            stack.down()
    _print(summary)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(summary, f, indent=2)
    # The post-sale reports are part of what the demo promises: none written is a failure.
    return 0 if summary["invariants_hold"] and "report_error" not in summary else 1


def _sale(
    args: argparse.Namespace, settings: Settings, stack: Stack, edge: Edge | None
) -> dict[str, Any]:
    bootstrap = stack.endpoints().bootstrap
    names = TopicNames.of(settings)
    sale_id = f"demo-{int(time.time())}"
    skus = [f"{sale_id}-sku-{chr(ord('A') + i)}" for i in range(args.skus)]
    allocations = [SkuAllocation(s, args.allocation, args.per_user_limit, 2) for s in skus]
    producer = CommandProducer(bootstrap, "flashsale-demo", topic=names.sku_commands)
    if edge is None:  # through the same service as the admin API (claim, write, facts)
        now = int(time.time() * 1000)
        if (
            asyncio.run(open_sale(settings, producer, sale_id, allocations, now, now + 3_600_000))
            is None
        ):
            raise RuntimeError(f"sale {sale_id} did not open")
    else:
        _open_over_http(edge.url, settings, sale_id, allocations)
    audit = DecisionAudit(bootstrap, names, sale_id)
    plan = plan_crowd(skus, args.intents, args.users, args.per_user_limit)
    print(
        f"sale {sale_id}: {len(skus)} SKUs x {args.allocation} units; "
        f"{len(plan.intents)} intents from {args.users} users ({plan.retries} retries, "
        f"{plan.over_limit_users} user/SKU pairs asking beyond the limit)"
    )
    t0 = time.monotonic()
    edge_figures: dict[str, Any] = {}
    if edge is None:  # an event producer writes pseudonyms too, never people's ids
        alias = KeyStore(stack.endpoints().dsn, settings.namespace).pseudonyms(
            p.user_id for p in plan.intents
        )
        futures = []
        for p in plan.intents:
            _, fut = producer.submit_intent(
                sale_id, p.sku, alias[p.user_id], p.quantity, p.idempotency_key
            )
            futures.append(fut)
            if len(futures) % 2000 == 0:
                audit.poll(0)
        producer.wait(futures)
        expected = {
            intent_id_for(alias[p.user_id], sale_id, p.sku, p.idempotency_key) for p in plan.intents
        }
    else:
        users = {p.user_id for p in plan.intents}
        secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
        tokens = {u: token(u, "shopper", 3600, secret) for u in users}
        print(f"live page: {edge.servers[0].url}/live/sales/{sale_id}  (operators only: each "
              "app server's own port, not nginx)")  # fmt: skip
        # The audit reads decisions while the crowd runs, so latency is measured live.
        stop = threading.Event()
        watcher = threading.Thread(target=_poll_until, args=(audit, stop), daemon=True)
        watcher.start()
        # A probe client (20 shoppers with event streams) measures what only a client sees.
        probers = {f"probe-{i}": token(f"probe-{i}", "shopper", 3600, secret) for i in range(20)}
        probed: list[ProbeResult] = []
        probe = threading.Thread(
            target=lambda: probed.append(run_probe(edge.url, sale_id, skus, probers)),
            daemon=True,
        )
        probe.start()
        try:
            with Progress(
                TextColumn("[bold]crowd[/bold]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=False,
            ) as bar:  # fmt: skip
                task = bar.add_task("crowd", total=len(plan.intents), rate="")
                began = time.monotonic()

                def shown(r: CrowdResult) -> None:
                    per_s = r.statuses.get(202, 0) / max(1e-9, time.monotonic() - began)
                    bar.update(task, completed=r.answered, rate=f"{per_s:,.0f} 202/s")

                crowd = drive_crowd(edge.url, sale_id, plan.intents, tokens, progress=shown)
                shown(crowd)
        finally:
            stop.set()
            watcher.join()
            probe.join(70)  # the probe's own bound: 60 s, and 5 s to spare
        if probed:
            probed[0].save(report_mod.probe_path(settings, sale_id))
        # The probe's intents are the sale's too: each must be decided like the crowd's.
        expected = set(crowd.queued.values()) | set(probed[0].intent_ids if probed else ())
        post_ms = [x * 1000 for x in crowd.accept_seconds]
        edge_figures = {
            "http_202": crowd.statuses.get(202, 0),
            "http_202_per_s": round(crowd.statuses.get(202, 0) / crowd.selling_seconds, 1)
            if crowd.selling_seconds
            else 0.0,
            "http_answers_per_s": round(crowd.answered / crowd.seconds, 1),
            "http_202_ms_p50": round(_percentile(post_ms, 50), 1) if post_ms else None,
            "http_202_ms_p99": round(_percentile(post_ms, 99), 1) if post_ms else None,
            "rejected_at_edge": dict(crowd.edge_rejections),
            "retried_after_429_or_503": crowd.retried_after_429_or_503,
        }
    acked_s = time.monotonic() - t0
    missing = audit.wait_for(expected, args.timeout)
    decided_s = time.monotonic() - t0
    time.sleep(0.5)
    audit.poll(0.5)  # late repeats, if any
    report = audit.report()
    audit.close()
    latencies = [
        audit.first_seen_ms[i] - audit.decisions[i][1]["decided_at"]
        for i in expected if i in audit.decisions
    ]  # fmt: skip
    orders = _wait_orders(stack.endpoints().dsn, sale_id, report.accepted, 60.0)
    verdict = sale_audit.audit_sale(bootstrap, names, sale_id)  # what `flashsale audit sale` says
    inputs = verdict.inputs
    # What `flashsale replay` says: every projection rebuilt from offset 0 equals the live one.
    replayed = replay.replay(
        dataclasses.replace(settings, kafka_bootstrap=bootstrap),
        stack.endpoints().dsn,
        progress=False,
    )
    return {
        "sale_id": sale_id,
        "intents": len(plan.intents),
        "unique_intents": len(expected),
        "retries_sent": plan.retries,
        "over_limit_user_skus": plan.over_limit_users,
        "accepted": report.accepted,
        "rejected": report.rejected,
        "rejected_by_reason": report.rejected_by_reason,
        "allocation": report.allocation,
        "accepted_units": report.accepted_units,
        "oversold": report.oversold,
        "missing_decisions": len(missing),
        "conflicting_decisions": len(report.conflicting),
        "repeated_decisions": report.repeated_decisions,
        "input_offsets": inputs.inputs,
        "input_offsets_unaccounted": len(inputs.unaccounted),
        "intents_with_extra_decisions": len(inputs.extra_decisions),
        "user_limit_breaches": report.user_limit_breaches,
        "sequence_gaps": report.sequence_gaps,
        "orders_in_postgres": orders,
        "latency_ms_p50": round(_percentile(latencies, 50), 1),
        "latency_ms_p99": round(_percentile(latencies, 99), 1),
        "intents_per_s": round(len(plan.intents) / decided_s, 1),
        "produce_seconds": round(acked_s, 2),
        "decide_seconds": round(decided_s, 2),
        "via": "direct" if edge is None else f"http {edge.url}",
        **edge_figures,
        "audit": "pass" if verdict.passed else "fail",
        "audit_violations": [f"{v.kind}: {v.detail}" for v in verdict.violations],
        "audit_records_per_s": verdict.as_json()["records_per_s"],
        "replay": "same" if replayed.same else "different",
        "replay_tables_different": [t.table for t in replayed.tables if not t.same],
        "replay_offsets_per_s": replayed.as_json()["offsets_per_s"],
        "invariants_hold": bool(
            report.invariants_hold
            and inputs.holds
            and not missing
            and orders == report.accepted
            and verdict.passed
            and replayed.same
        ),
    }


def _poll_until(audit: DecisionAudit, stop: threading.Event) -> None:
    while not stop.is_set():
        audit.poll(0.2)


def _open_over_http(url: str, settings: Settings, sale_id: str, skus: list[SkuAllocation]) -> None:
    """Open the sale through the admin API and wait until the edge can see it."""
    secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
    admin = {"Authorization": "Bearer " + token("demo-admin", "admin", 600, secret)}
    body = {
        "sale_id": sale_id,
        "skus": [
            {"sku": s.sku, "allocation": s.allocation, "per_user_limit": s.per_user_limit,
             "per_order_max": s.per_order_max}
            for s in skus
        ],
        "starts_in_s": 0,
        "duration_s": 3600,
    }  # fmt: skip
    with httpx.Client(base_url=url, timeout=15) as client:
        client.post("/v1/admin/sales", json=body, headers=admin).raise_for_status()
        # Every SKU projected: each app server then sees the sale whatever its feed has read.
        deadline = time.monotonic() + 120
        names = sorted(s.sku for s in skus)
        while (
            sorted(k["sku"] for k in client.get(f"/v1/sales/{sale_id}").json().get("skus", []))
            != names
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sale {sale_id} was not projected in 120 s")
            time.sleep(0.2)


def _write_reports(settings: Settings, stack: Stack, summary: dict[str, Any]) -> list[str]:
    """Each sale's post-sale report, once the analytics projection has caught up (a report
    that cannot be made is said in the summary and fails the demo; the sales' verdicts
    stand)."""
    from projections import analytics
    from projections.catch_up import wait_until_projected

    ep = stack.endpoints()
    names = TopicNames.of(settings)
    sales = [summary[k] for k in ("sale_id", "prequeue_sale_id", "holds_sale_id", "ops_sale_id")
             if k in summary]  # fmt: skip
    try:
        wait_until_projected(ep.bootstrap, ep.dsn, analytics.live_name(settings),
                             (names.sku_commands, names.decisions), timeout=120)  # fmt: skip
        return [str(report_mod.write_report(settings, ep.dsn, sale)) for sale in sales]
    except (TimeoutError, LookupError) as exc:
        summary["report_error"] = str(exc)
        return []


def _wait_orders(dsn: str, sale_id: str, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM orders WHERE sale_id = %s", (sale_id,))
            count = int(row.fetchone()[0])  # type: ignore[index]
            if count >= expected:
                break
            time.sleep(0.3)
    return count


def _print(s: dict[str, Any]) -> None:
    rows = [
        ("intents sent", s["intents"]),
        ("  of which retries (same key)", s["retries_sent"]),
        *(
            [
                ("via", s["via"]),
                ("HTTP 202 (queued)", s["http_202"]),
                ("HTTP answers/s (all statuses)", s["http_answers_per_s"]),
                ("HTTP 202/s (until the last 202)", s["http_202_per_s"]),
                ("HTTP POST to 202, p50 (ms)", s["http_202_ms_p50"]),
                ("HTTP POST to 202, p99 (ms)", s["http_202_ms_p99"]),
            ]
            if "http_202" in s
            else []
        ),
        *(
            (f"  rejected at the edge: {code}", n)
            for code, n in sorted(s.get("rejected_at_edge", {}).items())
        ),
        ("unique intents", s["unique_intents"]),
        ("accepted", s["accepted"]),
        ("rejected", s["rejected"]),
        *((f"  {reason.lower()}", n) for reason, n in sorted(s["rejected_by_reason"].items())),
        ("allocation (units)", sum(s["allocation"].values())),
        ("accepted units", sum(s["accepted_units"].values())),
        ("oversold", s["oversold"]),
        ("missing decisions", s["missing_decisions"]),
        ("conflicting decisions", s["conflicting_decisions"]),
        ("repeated decisions", s["repeated_decisions"]),
        ("input offsets of the sale", s["input_offsets"]),
        ("  not accounted for", s["input_offsets_unaccounted"]),
        ("users over limit who got more", s["user_limit_breaches"]),
        ("orders in postgres", s["orders_in_postgres"]),
        ("decision latency p50 (ms)", s["latency_ms_p50"]),
        ("decision latency p99 (ms)", s["latency_ms_p99"]),
        ("intents/s (end to end)", s["intents_per_s"]),
        (f"audit ({s['audit_records_per_s']} records/s)", s["audit"].upper()),
        *(("  violation", v) for v in s["audit_violations"][:10]),
        (f"replay ({s['replay_offsets_per_s']} offsets/s)", s["replay"].upper()),
        *(("  different", t) for t in s["replay_tables_different"]),
        *(
            [
                ("pre-queue sale", s["prequeue_sale_id"]),
                ("  draw commitment", s["draw_commitment"]),
                ("  revealed seed", s["draw_seed"]),
                ("  entrants (intents)", f"{s['prequeue_entrants']} ({s['prequeue_intents']})"),
                (
                    "  winners (bots among them)",
                    f"{s['prequeue_winners']} ({s['prequeue_bot_winners']}; bots were "
                    f"{s['prequeue_bot_entrants']} of {s['prequeue_entrants']} entrants)",
                ),
                ("  draw seen to last decision seen (ms)", s["draw_served_ms"]),
                ("  fairness audit", s["fairness_audit"].upper()),
                *(("  violation", v) for v in s["fairness_violations"]),
            ]
            if "draw_seed" in s
            else []
        ),
        *(
            [
                ("sale with holds", s["holds_sale_id"]),
                ("  held / paid / expired", f"{s['held']} / {s['paid']} / {s['expired']}"),
                (
                    "  declined / refunded / payments refused",
                    f"{s['declined']} / {s['refunded']} / {s['payments_refused']}",
                ),
                ("  waitlisted (served)", f"{s['waitlisted']} ({s['waitlist_served']})"),
                ("  provider charges", s["provider_charges"]),
                ("  sale audit", s["holds_audit"].upper()),
                *(("  violation", v) for v in s["holds_violations"]),
            ]
            if "holds_sale_id" in s
            else []
        ),
        *(
            [
                ("operator's sale", s["ops_sale_id"]),
                ("  deferred while paused", s["ops_deferred"]),
                ("  units added", s["ops_added"]),
                ("  paid, then refunded", f"{s['ops_paid']}, {s['ops_refunded']}"),
                ("  holds released", s["ops_released"]),
                ("  sale audit", s["ops_audit"].upper()),
                *(("  violation", v) for v in s["ops_violations"]),
            ]
            if "ops_sale_id" in s
            else []
        ),
        *(("post-sale report", path) for path in s.get("reports", [])),
        *([("post-sale report NOT WRITTEN", s["report_error"])] if "report_error" in s else []),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print()
    for label, value in rows:
        print(f"  {label:<{width}} {value}")
    print()
    print("  INVARIANTS HOLD" if s["invariants_hold"] else "  INVARIANT BROKEN", file=sys.stdout)
