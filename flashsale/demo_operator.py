"""The demo's fourth sale: the operator's controls, through the admin API.

A small sale with holds: the operator pauses it before the crowd arrives (everyone waits,
in order), adds units, resumes it (the waiting are decided in arrival order: the units go,
the rest wait in line), some winners pay, and then the operator calls the sale off: every
hold is released, every paid order refunded by the payment service, everyone waiting told.
Checked from the log (the sale audit) and the provider's own ledger (every charge refunded).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import psycopg

from flashsale import sale_audit
from flashsale.demo_orders import SaleLog, _pay
from flashsale.pseudonyms import KeyStore
from flashsale.settings import Settings
from flashsale.topics import TopicNames
from infra.edge import Edge
from infra.stack import Stack
from producers.cli import open_sale
from producers.commands import CommandProducer, SkuAllocation
from producers.http.auth import load_secret, token
from producers.http.config import EdgeSettings

Facts = list[tuple[str, dict[str, Any]]]


def run_operator_sale(
    settings: Settings, stack: Stack, edge: Edge | None, people: int = 40, allocation: int = 10,
    added: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Pause, add units, resume, pay, cancel; the figures for the summary and report."""
    endpoints = stack.endpoints()
    names = TopicNames.of(settings)
    sale_id, sku = f"demo-ops-{int(time.time())}", "ops-sku"
    producer = CommandProducer(endpoints.bootstrap, "flashsale-demo", topic=names.sku_commands)
    secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
    admin = {"Authorization": f"Bearer {token('demo-operator', 'admin', 3600, secret)}"}
    now = int(time.time() * 1000)
    opening = asyncio.run(open_sale(settings, producer, sale_id,
                                    [SkuAllocation(sku, allocation, 1, 1)], now - 1_000,
                                    now + 600_000, None, (60_000, 0, people)))  # fmt: skip
    if opening is None:
        raise RuntimeError(f"sale {sale_id} did not open")
    print(f"\noperator's sale {sale_id}: {allocation} units, {people} people; paused, "
          f"{added} units added, resumed, then cancelled")  # fmt: skip
    with (
        httpx.Client(timeout=15) as client,
        SaleLog(endpoints.bootstrap, names.decisions, sale_id, now) as log,
    ):

        def operator(what: str, **body: Any) -> None:
            if edge is None:
                command = {"pause": "PauseSale", "resume": "ResumeSale", "units": "AddUnits",
                           "cancel": "CancelSale"}[what]  # fmt: skip
                fields = {k: v for k, v in body.items() if k != "sku"}
                producer.sale_command(command, sale_id, [sku], **fields)
                return
            for _ in range(50):  # 404 until the app server that answers has read the opening
                reply = client.post(f"{edge.url}/v1/admin/sales/{sale_id}/{what}",
                                    json=body or None, headers=admin)  # fmt: skip
                if reply.status_code != 404:
                    break
                time.sleep(0.1)
            reply.raise_for_status()

        operator("pause")
        users = [f"{'payer' if n % 3 else 'idle'}-op-{n:03d}" for n in range(people)]
        alias = KeyStore(endpoints.dsn, settings.namespace).pseudonyms(users)
        producer.wait([producer.submit_intent(sale_id, sku, alias[u], 1, "op")[1] for u in users])
        facts = _until(log, lambda c: c["IntentDeferred"] >= people)
        operator("units", sku=sku, quantity=added, ref=f"{sale_id}-more")
        operator("resume")
        facts = _until(
            log,
            lambda c: (
                c["SaleResumed"] >= 1
                and c["IntentAccepted"] + c["Waitlisted"] + c["IntentRejected"] >= people
            ),
        )
        tokens = {alias[u]: token(u, "shopper", 3600, secret) for u in users}  # by pseudonym
        paying = {alias[u] for u in users if u.startswith("payer")}
        payers = [r for n, r in facts if n == "IntentAccepted" and r["user_id"] in paying]
        for rec in payers:
            _pay(client, edge, producer, sale_id, sku, rec, tokens[rec["user_id"]])
        _until(log, lambda c: c["OrderPaid"] >= len(payers))
        operator("cancel", reason="the demo calls it off")
        facts = _until(log, lambda c: c["SaleCancelled"] >= 1)
    producer.close()
    return _figures(settings, endpoints.dsn, names, sale_id, facts, people)


def _until(log: SaleLog, done: Any) -> Facts:
    deadline = time.monotonic() + 60
    while True:
        facts = log.read()
        if done(Counter(n for n, _ in facts)):
            return facts
        if time.monotonic() > deadline:
            raise RuntimeError(f"sale {log.sale_id}: the log did not get there in 60 s")
        time.sleep(0.3)


def _figures(
    settings: Settings, dsn: str, names: TopicNames, sale_id: str, facts: Facts, people: int
) -> dict[str, Any]:
    counts = Counter(n for n, _ in facts)
    attempts = [r["attempt_id"] for n, r in facts if n == "PaymentStarted"]
    deadline = time.monotonic() + 30
    while True:  # the payment service refunds what the cancel says
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE outcome = 'succeeded'),"
                " count(*) FILTER (WHERE refunded) FROM stub_payment_ledger"
                " WHERE namespace = %s AND attempt_id = ANY(%s)",
                (settings.namespace, attempts),
            ).fetchone()  # fmt: skip
        charged, refunded = (row[0], row[1]) if row else (0, 0)
        if refunded >= counts["OrderRefunded"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    audit = sale_audit.audit_sale(Stack(settings).endpoints().bootstrap, names, sale_id)
    decided = counts["IntentAccepted"] + counts["IntentRejected"]
    ok = (audit.passed and decided == people and charged == refunded
          and counts["OrderRefunded"] == counts["OrderPaid"])  # fmt: skip
    print(
        f"deferred {counts['IntentDeferred']}, added {_added(facts)}, held "
        f"{counts['IntentAccepted']}, paid {counts['OrderPaid']}, then cancelled: released "
        f"{counts['HoldCancelled']}, refunded {refunded} of {charged} charges, "
        f"{decided} of {people} decided; sale audit {'PASS' if audit.passed else 'FAIL'}"
    )
    return {
        "ops_sale_id": sale_id,
        "ops_deferred": counts["IntentDeferred"],
        "ops_added": _added(facts),
        "ops_held": counts["IntentAccepted"],
        "ops_intents": people,
        "ops_paid": counts["OrderPaid"],
        "ops_released": counts["HoldCancelled"],
        "ops_refunded": refunded,
        "ops_charges": charged,
        "ops_audit": "pass" if audit.passed else "fail",
        "ops_violations": [f"{v.kind}: {v.detail}" for v in audit.violations[:10]],
        "ops_invariants_hold": ok,
    }


def _added(facts: Facts) -> int:
    return sum(r["quantity"] for n, r in facts if n == "UnitsAdded")
