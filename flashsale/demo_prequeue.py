"""The demo's second sale: a fair pre-queue, drawn at the start by the sale clock.

People and bots queue before the start (the bots first, each with many intents); the sale
opens with a commitment to a secret seed; the sale clock reveals the seed at the start; the
writer decides the entries in the seed's order; `flashsale audit fairness` recomputes the
draw from the log. The bots win their share of *people*, not of requests.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flashsale import fairness
from flashsale.pseudonyms import KeyStore
from flashsale.settings import Settings
from flashsale.topics import TopicNames
from infra.edge import Edge
from infra.stack import Stack
from producers.cli import open_sale
from producers.commands import CommandProducer, SkuAllocation
from producers.crowd import PlannedIntent
from producers.http.auth import load_secret, token
from producers.http.config import EdgeSettings
from producers.http_crowd import drive_crowd

STARTS_IN_S = 12.0  # the pre-queue is open from now; the draw comes at the start


def run_prequeue_sale(
    settings: Settings,
    stack: Stack,
    edge: Edge | None,
    people: int = 2_000,
    bots: int = 50,
    bot_intents: int = 10,
    allocation: int = 200,
) -> dict[str, Any]:
    """Run the pre-queue sale; its figures for the demo's summary and report."""
    bootstrap = stack.endpoints().bootstrap
    names = TopicNames.of(settings)
    sale_id = f"demo-pq-{int(time.time())}"
    sku = f"{sale_id}-sku"
    plan = [PlannedIntent(f"bot{b:03d}", sku, 1, f"bot-{b}-{i}")
            for i in range(bot_intents) for b in range(bots)]  # fmt: skip
    plan += [PlannedIntent(f"person{p:05d}", sku, 1, f"p-{p}") for p in range(people)]
    starts = time.time() + STARTS_IN_S
    committed = _open(settings, edge, sale_id, SkuAllocation(sku, allocation, 1, 1), starts)
    crowd = f"{bots} bots x {bot_intents} intents first, then {people} people"
    print(f"\npre-queue sale {sale_id}: {allocation} units, limit 1; draw commitment "
          f"{committed}; {crowd}")  # fmt: skip
    alias = KeyStore(stack.endpoints().dsn, settings.namespace).pseudonyms(p.user_id for p in plan)
    bot_aliases = {alias[p.user_id] for p in plan if p.user_id.startswith("bot")}
    if edge is None:  # an event producer writes pseudonyms too, never people's ids
        producer = CommandProducer(bootstrap, "flashsale-demo", topic=names.sku_commands)
        producer.wait([producer.submit_intent(sale_id, p.sku, alias[p.user_id], 1,
                                              p.idempotency_key)[1] for p in plan])  # fmt: skip
    else:
        secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
        tokens = {p.user_id: token(p.user_id, "shopper", 3600, secret) for p in plan}
        answers = drive_crowd(edge.url, sale_id, plan, tokens)
        if answers.statuses.get(202, 0) != len(plan):  # bots stay within the per-user burst
            raise RuntimeError(f"the edge answered {dict(answers.statuses)} to {len(plan)} intents")
    queued = fairness.follow_sale(bootstrap, names.decisions, sale_id,
                                  fairness.counted("EntryQueued", len(plan)))  # fmt: skip
    entrants = sum(1 for n, r in queued if n == "EntryQueued" and r["kind"] == "ENTRY")
    print(f"queued: {len(plan)} intents, {entrants} entrants; the sale clock reveals the seed "
          f"at the start, in {max(0.0, starts - time.time()):.0f} s")  # fmt: skip
    facts, served_ms = _served(bootstrap, names.decisions, sale_id, len(plan))
    drawn = next(r for n, r in facts if n == "DrawRevealed")
    winners = [r["user_id"] for n, r in facts if n == "IntentAccepted"]
    audit = fairness.audit_fairness(bootstrap, names, sale_id)
    bot_wins = sum(1 for u in winners if u in bot_aliases)
    verdict = "PASS" if audit.passed else "FAIL"
    print(f"revealed seed {drawn['seed']}; {len(winners)} winners, {bot_wins} of them bots "
          f"({bots} of {entrants} entrants); fairness audit {verdict}")  # fmt: skip
    progress = [r for n, r in facts if n == "QueueProgress"]
    sold_out = next((r["after_sequence"] for r in progress if r["sold_out"]), None)
    went = "" if sold_out is None else f"; the last unit went at event #{sold_out}, and " \
        "everyone still waiting was told then"  # fmt: skip
    print(f"writer progress facts seen: {len(progress)} (every progress_every events{went})")
    return {
        "prequeue_sale_id": sale_id,
        "draw_commitment": committed,
        "draw_seed": drawn["seed"],
        "prequeue_entrants": entrants,
        "prequeue_intents": len(plan),
        "prequeue_winners": len(winners),
        "prequeue_bot_winners": bot_wins,
        "prequeue_bot_entrants": bots,
        "draw_served_ms": served_ms,
        "fairness_audit": "pass" if audit.passed else "fail",
        "fairness_violations": audit.violations[:10],
        "prequeue_progress_facts": len(progress),
    }


def _open(
    settings: Settings, edge: Edge | None, sale_id: str, sku: SkuAllocation, starts: float
) -> str:
    """Open the sale with a pre-queue from now; its draw commitment."""
    if edge is None:
        endpoints = Stack(settings).endpoints()
        producer = CommandProducer(endpoints.bootstrap, "flashsale-demo",
                                   topic=TopicNames.of(settings).sku_commands)  # fmt: skip
        starts_ms, now_ms = int(starts * 1000), int(time.time() * 1000)
        opening = asyncio.run(open_sale(settings, producer, sale_id, [sku], starts_ms,
                                        starts_ms + 600_000, now_ms - 1_000))  # fmt: skip
        if opening is None:
            raise RuntimeError(f"sale {sale_id} did not open")
        return str(opening.opened[sku.sku]["draw_commitment"])
    secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
    admin = {"Authorization": "Bearer " + token("demo-admin", "admin", 600, secret)}
    body = {"sale_id": sale_id, "skus": [{"sku": sku.sku, "allocation": sku.allocation,
            "per_user_limit": 1, "per_order_max": 1}], "starts_in_s": starts - time.time(),
            "duration_s": 600, "prequeue_s": 60}  # fmt: skip
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        reply = client.post("/v1/admin/sales", json=body, headers=admin)
        reply.raise_for_status()
        deadline = time.monotonic() + 60  # projected: every app server sees the sale
        while not client.get(f"/v1/sales/{sale_id}").json().get("skus"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sale {sale_id} was not projected in 60 s")
            time.sleep(0.2)
    return str(reply.json()["draw_commitment"])


def _served(
    bootstrap: str, topic: str, sale_id: str, total: int
) -> tuple[list[fairness.Fact], int]:
    """Follow the draw: positions served, as the decisions of the drawn entries arrive; the
    facts, and the ms from seeing the draw to seeing the last decision (all committed)."""
    seen_at: list[float] = []
    with Progress(TextColumn("[bold]draw[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn()) as bar:  # fmt: skip
        task = bar.add_task("draw", total=total, note="waiting for the reveal")

        def seen(facts: list[fairness.Fact]) -> None:
            decided = sum(1 for n, _ in facts if n in fairness.DECISIONS)
            ranked = [r["draw_rank"] for n, r in facts if n in fairness.DECISIONS
                      and r.get("draw_rank")]  # fmt: skip
            note = f"served up to rank {max(ranked)}" if ranked else "waiting for the reveal"
            bar.update(task, completed=decided, note=note)
            if any(n == "DrawRevealed" for n, _ in facts):
                seen_at.append(time.monotonic())

        facts = fairness.follow_sale(bootstrap, topic, sale_id,
                                     fairness.counted_decisions(total), timeout=120,
                                     seen=seen)  # fmt: skip
    return facts, round((seen_at[-1] - seen_at[0]) * 1000) if seen_at else 0
