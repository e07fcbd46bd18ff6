"""Holds, payments and expiry on the real stack: writer, payment service, stub provider.

Winners pay (one through a provider timeout, one declined, one too slow for the deadline
and its grace), others never pay; the writer is SIGKILLed with every hold outstanding and
the holds expire after its restart, once. The stub provider's own ledger must show charges =
paid + refunded, and the sale audit recomputes every transition from the topics.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from flashsale import sale_audit
from flashsale.fairness import counted, follow_sale
from flashsale.settings import Settings
from infra import processes
from infra.stack import Endpoints
from producers.commands import SkuAllocation
from producers.identity import intent_id_for
from tests.conftest import local_only
from tests.integration.pipeline import Pipeline, partition_of, with_payments

pytestmark = pytest.mark.slow

HOLD_MS, GRACE_MS, SLOW_S = 4_000, 1_000, 6.0


@pytest.fixture(scope="module")
def pipeline(settings: Settings, endpoints: Endpoints) -> Iterator[Pipeline]:
    local_only(settings)
    with with_payments(settings, endpoints, "orders" + uuid.uuid4().hex[:6], SLOW_S) as p:
        yield p


def _facts(p: Pipeline, sale: str, until: Any) -> list[tuple[str, dict[str, Any]]]:
    return follow_sale(p.endpoints.bootstrap, p.names.decisions, sale, until, timeout=60)


def test_payments_expiry_and_a_writer_crash_keep_every_unit_and_every_charge_accounted(
    settings: Settings, pipeline: Pipeline
) -> None:
    p = pipeline
    sale, sku = f"hold-{uuid.uuid4().hex[:6]}", f"sku-hold-{uuid.uuid4().hex[:6]}"
    producer = p.producer()
    now = int(time.time() * 1000)
    producer.open_sale(sale, [SkuAllocation(sku, 7, 1, 1)], now - 1_000, now + 3_600_000,
                       hold_ms=HOLD_MS, pay_grace_ms=GRACE_MS)  # fmt: skip
    users = [
        "payer-a",
        "payer-b",
        "timeout-c",
        "decline-d",
        "slow-e",
        "idle-f",
        "idle-g",
        "late-h",
    ]  # fmt: skip (late-h finds none left: 7 units)
    producer.wait([producer.submit_intent(sale, sku, u, 1, "k")[1] for u in users])
    facts = _facts(p, sale, counted("IntentRejected", 1))
    accepted = {r["user_id"]: r for n, r in facts if n == "IntentAccepted"}
    assert sorted(accepted) == sorted(users[:7]) and all(r["pay_by"] for r in accepted.values())
    order = {u: "ord-" + intent_id_for(u, sale, sku, "k") for u in users}
    for user in users[:5]:  # the payers start in time; the idle ones never do
        producer.order_command("StartPayment", sale, sku, order_id=order[user], user_id=user,
                               attempt_id=f"att-{user}")  # fmt: skip
    # payer-a, payer-b and timeout-c (after the provider's lost answer) are paid; decline-d
    # declined; slow-e is charged after its deadline and grace.
    facts = _facts(p, sale, counted("OrderPaid", 3))
    assert processes.wait_until(lambda: "PaymentDeclined" in {n for n, _ in _facts(
        p, sale, counted("OrderPaid", 3))}, 20)  # fmt: skip

    # Every remaining hold is outstanding when the writer dies; it expires after the restart.
    pid = p.processor.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert processes.wait_until(lambda: not processes.alive(pid), 20)
    time.sleep(max(0.0, (max(r["pay_by"] for r in accepted.values()) + GRACE_MS
                         - time.time() * 1000) / 1000) + 0.5)  # fmt: skip
    assert p.processor.start(p.env)
    part = partition_of(sku, settings.partitions)
    producer.tick([part])
    producer.tick([part])  # a second tick expires nothing again
    facts = _facts(p, sale, counted("HoldExpired", 4))  # decline-d, slow-e, idle-f, idle-g
    time.sleep(SLOW_S)  # slow-e's charge lands after all: voided and refunded
    facts = _facts(p, sale, counted("PaymentVoided", 1))

    names = Counter(n for n, _ in facts)
    assert (names["OrderPaid"], names["HoldExpired"], names["PaymentVoided"]) == (3, 4, 1)
    assert names["PaymentStarted"] == 5 and names["PaymentDeclined"] == 1
    paid = {r["order_id"] for n, r in facts if n == "OrderPaid"}
    assert paid == {order[u] for u in ("payer-a", "payer-b", "timeout-c")}
    expired = {r["order_id"] for n, r in facts if n == "HoldExpired"}
    assert expired == {order[u] for u in ("decline-d", "slow-e", "idle-f", "idle-g")}
    assert [r["remaining"] for n, r in facts if n == "HoldExpired"][-1] == 4  # 7 - 3 paid

    with psycopg.connect(p.endpoints.dsn) as conn:
        ledger = conn.execute(
            "SELECT attempt_id, outcome, refunded FROM stub_payment_ledger WHERE namespace = %s",
            (p.settings.namespace,),
        ).fetchall()
    charged = {a for a, outcome, _ in ledger if outcome == "succeeded"}
    refunded = {a for a, _, r in ledger if r}
    assert charged == {"att-payer-a", "att-payer-b", "att-timeout-c", "att-slow-e"}
    assert len(charged) == names["OrderPaid"] + names["PaymentVoided"]  # paid + refunded
    assert refunded == {"att-slow-e"}
    audit = sale_audit.audit_sale(p.endpoints.bootstrap, p.names, sale)
    assert audit.passed, audit.violations


def test_winners_who_never_pay_free_their_units_for_the_waitlist_and_the_allocation_sells(
    settings: Settings, pipeline: Pipeline
) -> None:
    p = pipeline
    sale, sku = f"wait-{uuid.uuid4().hex[:6]}", f"sku-wait-{uuid.uuid4().hex[:6]}"
    producer = p.producer()
    now = int(time.time() * 1000)
    allocation, people = 10, 25
    producer.open_sale(sale, [SkuAllocation(sku, allocation, 1, 1)], now - 1_000,
                       now + 3_600_000, hold_ms=2_000, pay_grace_ms=500,
                       waitlist_depth=20)  # fmt: skip
    users = [f"idle-{n}" if n in (1, 4, 7) else f"buyer-{n}" for n in range(people)]
    producer.wait([producer.submit_intent(sale, sku, u, 1, "k")[1] for u in users])
    part = partition_of(sku, settings.partitions)
    paying: set[str] = set()
    deadline = time.monotonic() + 60
    facts: list[tuple[str, dict[str, Any]]] = []
    while time.monotonic() < deadline:
        facts = _facts(p, sale, lambda fs: len(fs) > 0)
        for name, rec in facts:  # every held order of a buyer is paid, at once
            if name == "IntentAccepted" and rec["user_id"].startswith("buyer") \
                    and rec["order_id"] not in paying:  # fmt: skip
                paying.add(rec["order_id"])
                producer.order_command("StartPayment", sale, sku, order_id=rec["order_id"],
                                       user_id=rec["user_id"],
                                       attempt_id="att-" + rec["order_id"])  # fmt: skip
        decided = Counter(n for n, _ in facts)
        if decided["IntentAccepted"] + decided["IntentRejected"] == people:
            break
        producer.tick([part])  # the sale clock's job: deadlines pass on log time
        time.sleep(0.5)
    names = Counter(n for n, _ in facts)
    assert names["Waitlisted"] == people - allocation  # 15 waited (depth 20)
    assert names["HoldExpired"] == 3  # the three who never paid
    assert names["OrderPaid"] == allocation  # the whole allocation sold to people who paid
    # Exactly one decision per intent: 13 accepted (10 + 3 served), 12 told no unit came back.
    decisions = [r["intent_id"] for n, r in facts if n in ("IntentAccepted", "IntentRejected")]
    assert len(decisions) == len(set(decisions)) == people
    rejected = [r for n, r in facts if n == "IntentRejected"]
    assert {r["detail"] for r in rejected} == {"no unit can come back"} and len(rejected) == 12
    served = [r for n, r in facts if n == "IntentAccepted"][allocation:]
    waited = [r["intent_id"] for n, r in facts if n == "Waitlisted"]
    assert [r["intent_id"] for r in served] == waited[:3]  # in line order
    with psycopg.connect(p.endpoints.dsn) as conn:
        charged = conn.execute(
            "SELECT count(*) FROM stub_payment_ledger WHERE namespace = %s AND order_id = ANY(%s)"
            " AND outcome = 'succeeded'", (p.settings.namespace, sorted(paying)),
        ).fetchone()[0]  # fmt: skip
    assert charged == names["OrderPaid"] + names["PaymentVoided"]
    audit = sale_audit.audit_sale(p.endpoints.bootstrap, p.names, sale)
    assert audit.passed, audit.violations
