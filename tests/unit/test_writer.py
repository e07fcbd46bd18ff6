"""SkuWriter, the processor's shell without Faust: bytes in, deterministic bytes out."""

from __future__ import annotations

from typing import Any

from processors.writer import SkuWriter
from producers.crowd import plan_crowd
from schemas.codec import SchemaRegistry

REG = SchemaRegistry.load_default()
NOW = 1_800_000_000_000


def env(i: int | str) -> dict[str, Any]:
    return {"event_id": f"e{i}", "correlation_id": None, "producer": "t", "occurred_at": NOW}


def opened(allocation: int = 2) -> bytes:
    return REG.encode("SaleOpened", {**env("o"), "sale_id": "s", "sku": "A",
                                     "allocation": allocation, "per_user_limit": 5,
                                     "per_order_max": 5, "starts_at": NOW - 1,
                                     "ends_at": NOW + 60_000})  # fmt: skip


def intent(i: int, quantity: int = 1) -> bytes:
    return REG.encode("PurchaseIntent", {**env(i), "intent_id": f"i{i}", "idempotency_key": "k",
                                         "user_id": f"u{i}", "sale_id": "s", "sku": "A",
                                         "quantity": quantity})  # fmt: skip


def fresh() -> SkuWriter:
    w = SkuWriter(REG)
    w.stale = False
    return w


def test_redelivered_intent_gets_byte_identical_decision_and_is_counted():
    w = fresh()
    w.handle(opened(), NOW)
    first = w.handle(intent(1), NOW)
    again = w.handle(intent(1), NOW + 5)
    assert first.redelivered == 0 and again.redelivered == 1
    assert first.decisions == again.decisions
    assert again.table_writes == first.table_writes  # rewritten identically


def test_decisions_rebuilt_from_tables_continue_identically():
    w = fresh()
    w.handle(opened(allocation=2), NOW)
    table: dict[str, bytes] = {}
    sales: dict[str, bytes] = {}
    for i in range(3):
        out = w.handle(intent(i), NOW)
        for name, key, value in out.table_writes:
            (table if name == SkuWriter.DECISIONS else sales)[key] = value
    sales.update({k: v for n, k, v in fresh().handle(opened(2), NOW).table_writes})
    rebuilt = SkuWriter(REG)
    rebuilt.rebuild(table.values(), sales.items())
    assert rebuilt.handle(intent(1), NOW).decisions == w.handle(intent(1), NOW).decisions
    assert rebuilt.handle(intent(9), NOW).decisions == w.handle(intent(9), NOW).decisions


def test_bad_records_are_dead_letters_with_reasons():
    w = fresh()
    assert w.handle(b"\x00garbage", NOW).dead_letter.reason == "bad-magic"  # type: ignore[union-attr]
    assert w.handle(None, NOW).dead_letter.reason == "empty-value"  # type: ignore[union-attr]
    accepted = REG.encode("IntentAccepted", {**env(1), "intent_id": "i", "sale_id": "s",
                                             "sku": "A", "user_id": "u", "quantity": 1,
                                             "order_id": "o", "remaining": 0, "sequence": 1,
                                             "decided_at": NOW})  # fmt: skip
    out = w.handle(accepted, NOW)
    assert out.dead_letter is not None and out.dead_letter.reason == "wrong-schema"
    assert out.decisions == [] and out.table_writes == []


def test_negative_quantity_is_a_rule_fault_not_a_dead_letter():
    w = fresh()
    w.handle(opened(), NOW)
    out = w.handle(intent(1, quantity=-2), NOW)
    assert out.dead_letter is None
    name, record = REG.decode(out.decisions[0][1])
    assert name == "IntentRejected" and record["reason"] == "INVALID_QUANTITY"


def test_demo_crowd_contains_its_stressors():
    plan = plan_crowd(["A", "B", "C"], intents=20_000, users=5_000)
    assert len(plan.intents) == 20_000
    assert plan.retries == sum(1 for p in plan.intents if p.retry) > 0
    assert plan.over_limit_users > 0 and plan.invalid_quantity > 0
    keys = {(p.user_id, p.idempotency_key) for p in plan.intents}
    assert len(keys) == 20_000 - plan.retries
