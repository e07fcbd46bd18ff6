"""The order lifecycle's races and the operator's controls on the real stack.

Writer, projector and payment service (stub provider with its own ledger) run as processes;
the tests write commands to the SKU command topic as the edge, the sale clock and the admin
API do, and check the facts, the provider's ledger, PostgreSQL's projections and the sale
audit (every transition re-decided from the topics, every input offset accounted for).
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

from flashsale import input_audit, sale_audit
from flashsale.fairness import counted, follow_sale
from flashsale.settings import Settings
from infra import processes
from infra.stack import Endpoints
from producers.commands import CommandProducer, SkuAllocation
from producers.identity import intent_id_for
from schemas.codec import SchemaRegistry
from tests.conftest import local_only
from tests.integration.pipeline import Pipeline, partition_of, with_payments

pytestmark = pytest.mark.slow
Fact = tuple[str, dict[str, Any]]


@pytest.fixture(scope="module")
def pipeline(settings: Settings, endpoints: Endpoints) -> Iterator[Pipeline]:
    local_only(settings)
    with with_payments(settings, endpoints, "ops" + uuid.uuid4().hex[:6], 0) as p:
        yield p


def _facts(p: Pipeline, sale: str, until: Any) -> list[Fact]:
    """The sale's facts from the start, read until ``until`` holds (maybe not all of them)."""
    return follow_sale(p.endpoints.bootstrap, p.names.decisions, sale, until, timeout=60)


def _all_facts(p: Pipeline, sale: str) -> list[Fact]:
    """Every committed fact of the sale, the decisions topic read to its end."""
    msgs = input_audit.read_topic(p.endpoints.bootstrap, p.names.decisions, True, 60)
    decoded = input_audit.decode_all(SchemaRegistry.load_default(), msgs)
    return [(n, r) for _, _, n, r in sorted(decoded, key=lambda d: (d[0], d[1]))
            if r.get("sale_id") == sale]  # fmt: skip


def _open(p: Pipeline, allocation: int, **holds: int) -> tuple[CommandProducer, str, str]:
    sale, sku = f"op-{uuid.uuid4().hex[:6]}", f"sku-op-{uuid.uuid4().hex[:6]}"
    producer = p.producer()
    now = int(time.time() * 1000)
    producer.open_sale(sale, [SkuAllocation(sku, allocation, 1, 1)], now - 1_000,
                       now + 3_600_000, **holds)  # fmt: skip
    return producer, sale, sku


def _ledger(p: Pipeline, attempts: set[str]) -> tuple[set[str], set[str]]:
    """(charged, refunded) attempts among ``attempts``, from the provider's own ledger."""
    with psycopg.connect(p.endpoints.dsn) as conn:
        rows = conn.execute(
            "SELECT attempt_id, outcome, refunded FROM stub_payment_ledger"
            " WHERE namespace = %s AND attempt_id = ANY(%s)",
            (p.settings.namespace, sorted(attempts)),
        ).fetchall()
    return {a for a, o, _ in rows if o == "succeeded"}, {a for a, _, r in rows if r}


def test_payments_racing_the_deadline_each_end_one_way_and_every_charge_is_accounted(
    settings: Settings, pipeline: Pipeline
) -> None:
    """No grace: a payment whose result lands after the deadline is voided and refunded,
    whether a tick expired its hold first or the late result did. One payment starts at once
    and is paid before the race (so the paid path surely runs, however slow the machine);
    the others start from just before to just after each deadline while the clock ticks."""
    p = pipeline
    hold_ms, people = 4_000, 12
    producer, sale, sku = _open(p, people, hold_ms=hold_ms, pay_grace_ms=0)
    users = [f"race-{n}" for n in range(people)]
    producer.wait([producer.submit_intent(sale, sku, u, 1, "k")[1] for u in users])
    accepted = {r["user_id"]: r for n, r in _facts(p, sale, counted("IntentAccepted", people))
                if n == "IntentAccepted"}  # fmt: skip
    part = partition_of(sku, settings.partitions)
    pay_by = min(r["pay_by"] for r in accepted.values())

    def start_payment(user: str) -> None:
        producer.order_command("StartPayment", sale, sku, order_id=accepted[user]["order_id"],
                               user_id=user, attempt_id=f"att-{sale}-{user}")  # fmt: skip

    start_payment(users[0])
    _facts(p, sale, counted("OrderPaid", 1))
    # Offsets from the earliest deadline: -300 ms .. +200 ms, 50 ms apart, ticks in between.
    for n, user in enumerate(users[1:]):
        aim = pay_by - 300 + 50 * n
        time.sleep(max(0.0, aim / 1000 - time.time()))
        start_payment(user)
        producer.tick([part])
    time.sleep(1.0)
    producer.tick([part])  # whatever is still held is overdue by now
    _facts(p, sale, lambda fs: sum(1 for n, _ in fs if n in ("OrderPaid", "HoldExpired"))
           >= people)  # fmt: skip
    time.sleep(1.0)  # the last results of the provider land (voided after an expiry)
    producer.tick([part])
    facts = _all_facts(p, sale)
    names = Counter(n for n, _ in facts)
    final: dict[str, list[str]] = {}
    for name, rec in facts:
        if name in ("OrderPaid", "HoldExpired", "HoldCancelled"):
            final.setdefault(rec["order_id"], []).append(name)
    assert sorted(final) == sorted(r["order_id"] for r in accepted.values())
    assert all(len(v) == 1 for v in final.values()), final  # one outcome each
    assert names["OrderPaid"] >= 1 and names["HoldExpired"] >= 1, names  # the race was run
    attempts = {f"att-{sale}-{u}" for u in users}
    voided = {r["attempt_id"] for n, r in facts if n == "PaymentVoided"}
    assert assert_eventually(lambda: _ledger(p, attempts)[1] == voided)
    charged, _ = _ledger(p, attempts)
    assert len(charged) == names["OrderPaid"] + len(voided)  # charges = paid + refunded
    audit = sale_audit.audit_sale(p.endpoints.bootstrap, p.names, sale)
    assert audit.passed, audit.violations


def assert_eventually(check: Any, timeout: float = 20) -> bool:
    return processes.wait_until(check, timeout)


def test_a_stopped_sale_clock_delays_expiry_but_never_loses_or_doubles_one(
    settings: Settings, pipeline: Pipeline
) -> None:
    p = pipeline
    producer, sale, sku = _open(p, 3, hold_ms=1_000)
    producer.wait([producer.submit_intent(sale, sku, f"idle-{n}", 1, "k")[1] for n in range(3)])
    accepted = [r for n, r in _facts(p, sale, counted("IntentAccepted", 3))
                if n == "IntentAccepted"]  # fmt: skip
    time.sleep(3.0)  # every deadline passes with no tick: nothing expires
    probe = producer.submit_intent(sale, sku, "late-1", 1, "k")[1]  # another command: no expiry
    producer.wait([probe])
    facts = _facts(p, sale, counted("IntentRejected", 1))
    assert not any(n == "HoldExpired" for n, _ in facts)
    part = partition_of(sku, settings.partitions)
    first = producer.tick([part])  # the clock comes back: every overdue hold expires, once
    producer.tick([part])
    producer.tick([part])
    _facts(p, sale, counted("HoldExpired", 3))
    time.sleep(1.0)  # and the later ticks expired nothing again
    facts = _all_facts(p, sale)
    expired = [r for n, r in facts if n == "HoldExpired"]
    assert sorted(r["order_id"] for r in expired) == sorted(r["order_id"] for r in accepted)
    assert all(r["decided_at"] == first for r in expired)  # late, at the tick that came back
    assert all(r["decided_at"] > max(a["pay_by"] for a in accepted) for r in expired)
    audit = sale_audit.audit_sale(p.endpoints.bootstrap, p.names, sale)
    assert audit.passed, audit.violations


def test_pause_add_units_and_cancel_mid_sale_across_a_writer_crash(
    settings: Settings, pipeline: Pipeline
) -> None:
    """Three winners (one pays), a pause with three intents waiting, the writer SIGKILLed and
    restarted while they wait, two units added (the command sent twice), the resume (two of
    them get the added units, one waits), then the sale cancelled: holds released, the paid
    order refunded by the payment service, the waiting one told; an intent after that is
    refused. PostgreSQL's orders and counters follow."""
    p = pipeline
    producer, sale, sku = _open(p, 3, hold_ms=600_000, waitlist_depth=5)
    intent = {u: intent_id_for(u, sale, sku, "k") for u in [f"u{n}" for n in range(1, 8)]}
    producer.wait([producer.submit_intent(sale, sku, u, 1, "k")[1] for u in ("u1", "u2", "u3")])
    _facts(p, sale, counted("IntentAccepted", 3))
    producer.order_command("StartPayment", sale, sku, order_id="ord-" + intent["u1"],
                           user_id="u1", attempt_id=f"att-{sale}-u1")  # fmt: skip
    _facts(p, sale, counted("OrderPaid", 1))
    producer.sale_command("PauseSale", sale, [sku])
    producer.wait([producer.submit_intent(sale, sku, u, 1, "k")[1] for u in ("u4", "u5", "u6")])
    facts = _facts(p, sale, counted("IntentDeferred", 3))
    assert [r["intent_id"] for n, r in facts if n == "IntentDeferred"] == [
        intent["u4"], intent["u5"], intent["u6"]]  # fmt: skip

    pid = p.processor.pid()  # the three wait in the writer's state when it dies
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert processes.wait_until(lambda: not processes.alive(pid), 20)
    assert p.processor.start(p.env)
    for _ in range(2):  # a retried command adds once
        producer.sale_command("AddUnits", sale, [sku], quantity=2, ref=f"add-{sale}")
    producer.sale_command("ResumeSale", sale, [sku])
    _facts(p, sale, counted("Waitlisted", 1))
    after = [(n, r.get("intent_id")) for n, r in _all_facts(p, sale)][-4:]
    assert after == [("SaleResumed", None), ("IntentAccepted", intent["u4"]),
                     ("IntentAccepted", intent["u5"]), ("Waitlisted", intent["u6"])]  # fmt: skip

    producer.sale_command("CancelSale", sale, [sku], reason="mispriced")
    producer.wait([producer.submit_intent(sale, sku, "u7", 1, "k")[1]])
    _facts(p, sale, lambda fs: any(r.get("intent_id") == intent["u7"] for _, r in fs))
    facts = _all_facts(p, sale)
    names = Counter(n for n, _ in facts)
    assert (names["UnitsAdded"], names["SaleCancelled"], names["OrderRefunded"]) == (1, 1, 1)
    assert names["HoldCancelled"] == 4  # u2, u3, u4, u5
    told = {r["intent_id"]: r["reason"] for n, r in facts if n == "IntentRejected"}
    assert told == {intent["u6"]: "SALE_ENDED", intent["u7"]: "SALE_ENDED"}
    decisions = [r["intent_id"] for n, r in facts if n in ("IntentAccepted", "IntentRejected")]
    assert sorted(decisions) == sorted(intent.values())  # one decision each, none lost

    attempt = {f"att-{sale}-u1"}
    assert assert_eventually(lambda: _ledger(p, attempt) == (attempt, attempt))  # refunded
    with psycopg.connect(p.endpoints.dsn) as conn:

        def projected() -> bool:
            row = conn.execute("SELECT count(*) FROM lifecycle_events WHERE sale_id = %s",
                               (sale,)).fetchone()  # fmt: skip
            return row is not None and row[0] == sum(
                names[k] for k in ("PaymentStarted", "OrderPaid", "SalePaused", "IntentDeferred",
                                   "UnitsAdded", "SaleResumed", "Waitlisted", "SaleCancelled",
                                   "HoldCancelled", "OrderRefunded"))  # fmt: skip

        assert assert_eventually(projected)
        status = dict(conn.execute("SELECT user_id, status FROM orders WHERE sale_id = %s",
                                   (sale,)).fetchall())  # fmt: skip
        counters = conn.execute(
            "SELECT paid_orders, refunded_orders, cancelled_orders, deferred_intents,"
            " waitlisted_intents, added_units, cancelled, paused FROM lifecycle_counters"
            " WHERE sale_id = %s", (sale,)).fetchone()  # fmt: skip
        closed = conn.execute("SELECT closed FROM sales WHERE sale_id = %s", (sale,)).fetchone()
    assert status == {"u1": "refunded", "u2": "cancelled", "u3": "cancelled",
                      "u4": "cancelled", "u5": "cancelled"}  # fmt: skip
    assert counters == (1, 1, 4, 3, 1, 2, True, False) and closed == (True,)
    audit = sale_audit.audit_sale(p.endpoints.bootstrap, p.names, sale)
    assert audit.passed, audit.violations
    assert audit.inputs.unaccounted == []
