"""The demo's third sale: orders held for payment, a waitlist, and people who never pay.

A crowd asks for more than there is; each winner's order is held for a few seconds. Most
winners pay (through ``POST /v1/orders/{id}/pay``, charged by the payment service's stub
provider); some never do, some are declined. Their holds expire on the sale clock's ticks
and the units go to the waitlist, whose people pay or not in turn, until the allocation is
sold to people who paid and everyone still waiting hears at once. Checked from the log (the
sale audit) and against the provider's own ledger (charges = paid + refunded).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import psycopg

from flashsale import input_audit, sale_audit
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
from schemas.codec import SchemaRegistry

HOLD_S, GRACE_S = 3.0, 1.0


def _person(n: int) -> str:
    """Three in ten never pay, one in ten is declined (the stub provider's rule), the rest
    pay at once."""
    kind = {0: "idle", 1: "idle", 2: "idle", 3: "decline"}.get(n % 10, "payer")
    return f"{kind}-{n:04d}"


def run_orders_sale(
    settings: Settings, stack: Stack, edge: Edge | None, people: int = 300, allocation: int = 100
) -> dict[str, Any]:
    """Run the sale with holds; its figures for the demo's summary and report."""
    endpoints = stack.endpoints()
    names = TopicNames.of(settings)
    sale_id = f"demo-hold-{int(time.time())}"
    sku = f"{sale_id}-sku"
    depth = people - allocation  # everyone who does not win at first may wait
    producer = CommandProducer(endpoints.bootstrap, "flashsale-demo", topic=names.sku_commands)
    plan = [PlannedIntent(_person(n), sku, 1, f"o-{n}") for n in range(people)]
    secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
    alias = KeyStore(endpoints.dsn, settings.namespace).pseudonyms(p.user_id for p in plan)
    tokens = {p.user_id: token(p.user_id, "shopper", 3600, secret) for p in plan}
    # The log names people by pseudonym: a record's user_id finds the person's token here.
    by_alias = {alias[u]: t for u, t in tokens.items()}
    kinds = {alias[p.user_id]: p.user_id.split("-")[0] for p in plan}
    now = int(time.time() * 1000)
    holds = (int(HOLD_S * 1000), int(GRACE_S * 1000), depth)
    opening = asyncio.run(open_sale(settings, producer, sale_id,
                                    [SkuAllocation(sku, allocation, 1, 1)], now - 1_000,
                                    now + 600_000, None, holds))  # fmt: skip
    if opening is None:
        raise RuntimeError(f"sale {sale_id} did not open")
    print(f"\nsale with holds {sale_id}: {allocation} units, {people} people, orders held "
          f"{HOLD_S:g} s to pay, a waitlist of {depth}")  # fmt: skip
    if edge is None:
        producer.wait([producer.submit_intent(sale_id, sku, alias[p.user_id], 1,
                                              p.idempotency_key)[1] for p in plan])  # fmt: skip
    else:
        answers = drive_crowd(edge.url, sale_id, plan, tokens)
        if answers.statuses.get(202, 0) != people:
            raise RuntimeError(f"the edge answered {dict(answers.statuses)} to {people} intents")
    with SaleLog(endpoints.bootstrap, names.decisions, sale_id, now) as log:
        facts = _pay_until_decided(log, edge, producer, sale_id, sku, people, by_alias, kinds)
    producer.close()
    return {**_figures(settings, endpoints.dsn, names, sale_id, facts, allocation),
            "holds_intents": people}  # fmt: skip


def _pay_until_decided(
    log: SaleLog,
    edge: Edge | None,
    producer: CommandProducer,
    sale_id: str,
    sku: str,
    people: int,
    tokens: dict[str, str],
    kinds: dict[str, str],
) -> list[tuple[str, dict[str, Any]]]:
    """Pay every order of a payer as soon as it is accepted, until every intent is decided
    (``tokens`` and ``kinds`` by pseudonym)."""
    paying: set[str] = set()
    deadline = time.monotonic() + 120
    facts: list[tuple[str, dict[str, Any]]] = []
    with httpx.Client(timeout=15) as client:
        while time.monotonic() < deadline:
            facts = log.read()
            for name, rec in facts:
                if name != "IntentAccepted" or rec["order_id"] in paying:
                    continue
                paying.add(rec["order_id"])
                if kinds[rec["user_id"]] == "idle":
                    continue  # never pays: the hold expires and the unit goes to the line
                _pay(client, edge, producer, sale_id, sku, rec, tokens[rec["user_id"]])
            counts = Counter(n for n, _ in facts)
            print(f"  held {counts['IntentAccepted']}, paid {counts['OrderPaid']}, expired "
                  f"{counts['HoldExpired']}, waiting {counts['Waitlisted']}, rejected "
                  f"{counts['IntentRejected']}", end="\r")  # fmt: skip
            if (
                counts["IntentAccepted"] + counts["IntentRejected"] >= people
                and not any(n == "IntentAccepted" and r["order_id"] not in paying for n, r in facts)
                and counts["OrderPaid"] + counts["HoldExpired"] >= counts["IntentAccepted"]
            ):
                break
            time.sleep(0.5)
    print()
    return facts


def sale_facts(bootstrap: str, topic: str, sale_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The sale's committed facts in log order, read to the topic's end as of now."""
    with SaleLog(bootstrap, topic, sale_id) as log:
        return log.read()


class SaleLog:
    """A sale's committed facts in log order, read forward as the sale goes: each ``read``
    adds what was appended since the last. Given the time the sale was opened it starts
    there, so a poll costs what is new, not the whole topic (a namespace holding millions of
    earlier facts took 33 s a read, longer than a 3 s hold)."""

    def __init__(self, bootstrap: str, topic: str, sale_id: str,
                 opened_ms: int | None = None) -> None:  # fmt: skip
        since = None if opened_ms is None else opened_ms - 60_000  # clocks of one machine
        self._registry = SchemaRegistry.load_default()  # first: nothing to close if it fails
        self._tail = input_audit.TopicTail(bootstrap, topic, True, since)
        self.sale_id = sale_id
        self.facts: list[tuple[str, dict[str, Any]]] = []

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        msgs = self._tail.read(30)
        self.facts += [(name, rec) for _, _, name, rec in
                       input_audit.decode_all(self._registry, msgs)
                       if name and rec.get("sale_id") == self.sale_id]  # fmt: skip
        return list(self.facts)

    def __enter__(self) -> SaleLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tail.close()


def _pay(
    client: httpx.Client,
    edge: Edge | None,
    producer: CommandProducer,
    sale_id: str,
    sku: str,
    rec: dict[str, Any],
    bearer: str,
) -> None:
    if edge is None:
        attempt = "demo-" + rec["order_id"]
        producer.order_command("StartPayment", sale_id, sku, order_id=rec["order_id"],
                               user_id=rec["user_id"], attempt_id=attempt)  # fmt: skip
        return
    for _ in range(50):  # the app server that answers may not have read the decision yet
        reply = client.post(f"{edge.url}/v1/orders/{rec['order_id']}/pay",
                            headers={"Authorization": f"Bearer {bearer}",
                                     "Idempotency-Key": "demo"})  # fmt: skip
        if reply.status_code not in (404, 409) or reply.json()["error"]["code"] not in (
            "unknown_order",
            "order_pending",
        ):
            break
        time.sleep(0.1)
    reply.raise_for_status()


def _figures(
    settings: Settings,
    dsn: str,
    names: TopicNames,
    sale_id: str,
    facts: list[tuple[str, dict[str, Any]]],
    allocation: int,
) -> dict[str, Any]:
    counts = Counter(n for n, _ in facts)
    waited = {r["intent_id"] for n, r in facts if n == "Waitlisted"}
    served = sum(1 for n, r in facts if n == "IntentAccepted" and r["intent_id"] in waited)
    orders = [r["order_id"] for n, r in facts if n == "IntentAccepted"]
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE outcome = 'succeeded'), count(*) FILTER (WHERE refunded)"
            " FROM stub_payment_ledger WHERE namespace = %s AND order_id = ANY(%s)",
            (settings.namespace, orders),
        ).fetchone()  # fmt: skip
    charged, refunded = (row[0], row[1]) if row else (0, 0)
    audit = sale_audit.audit_sale(Stack(settings).endpoints().bootstrap, names, sale_id)
    paid = counts["OrderPaid"]
    # Payers pay as soon as they see their hold: none paying means the demo did not run.
    ok = audit.passed and 0 < paid <= allocation and charged == paid + counts["PaymentVoided"]
    print(f"held {counts['IntentAccepted']}, paid {paid} of {allocation}, expired "
          f"{counts['HoldExpired']}, declined {counts['PaymentDeclined']}, refunded "
          f"{refunded}, payments refused {counts['OrderRefused']}, waitlisted {len(waited)} "
          f"(served {served}); provider charges "
          f"{charged} = paid + refunded: {charged == paid + counts['PaymentVoided']}; "
          f"sale audit {'PASS' if audit.passed else 'FAIL'}")  # fmt: skip
    return {
        "holds_sale_id": sale_id,
        "held": counts["IntentAccepted"],
        "paid": paid,
        "expired": counts["HoldExpired"],
        "declined": counts["PaymentDeclined"],
        "refunded": refunded,
        "payments_refused": counts["OrderRefused"],
        "waitlisted": len(waited),
        "waitlist_served": served,
        "provider_charges": charged,
        "holds_audit": "pass" if audit.passed else "fail",
        "holds_violations": [f"{v.kind}: {v.detail}" for v in audit.violations[:10]],
        "holds_invariants_hold": ok,
    }
