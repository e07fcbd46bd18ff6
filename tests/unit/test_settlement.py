"""Settling a closed sale bounds the writer's state without ever re-deciding an intent."""

from __future__ import annotations

from typing import Any

from processors.decision import (
    CloseSale,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    RejectionReason,
    SaleRejected,
    SaleSettled,
    SaleTerms,
    SettleSale,
    SkuLedger,
    decide,
)
from processors.writer import SkuWriter, pack_settled, unpack_settled
from schemas.codec import SchemaRegistry

T0 = 1_000
TERMS = SaleTerms("s", "A", allocation=3, per_user_limit=2, per_order_max=2,
                  starts_at_ms=T0, ends_at_ms=T0 + 10_000)  # fmt: skip


def sold(n: int) -> SkuLedger:
    ledger = SkuLedger("A")
    decide(ledger, OpenSale(TERMS), T0)
    for i in range(n):
        decide(ledger, PlaceIntent(f"i{i}", f"u{i}", "s", "A", 1), T0 + 1)
    return ledger


def test_open_sale_cannot_be_settled():
    ledger = sold(2)
    events = decide(ledger, SettleSale("s", "A"), T0 + 2)
    assert isinstance(events[0], SaleRejected)
    assert len(ledger.sales["s"].decided) == 2


def test_settled_sale_forgets_decisions_but_never_redecides_them():
    ledger = sold(5)  # 3 accepted, 2 sold out
    decide(ledger, CloseSale("s", "A"), T0 + 3)
    (settled,) = decide(ledger, SettleSale("s", "A"), T0 + 4)
    assert isinstance(settled, SaleSettled)
    assert sorted(settled.forgotten) == [f"i{i}" for i in range(5)]
    book = ledger.sales["s"]
    assert book.decided == {} and book.bought == {} and len(book.digests) == 5
    # A repeat of a decided intent gets nothing new: its first decision stands.
    assert decide(ledger, PlaceIntent("i0", "u0", "s", "A", 1), T0 + 5) == []
    assert ledger.sequence == 5
    # A brand-new intent still gets exactly one decision, with the next sequence number.
    (new,) = decide(ledger, PlaceIntent("fresh", "u9", "s", "A", 1), T0 + 5)
    assert isinstance(new, IntentRejected) and new.reason is RejectionReason.SALE_ENDED
    assert new.sequence == 6
    assert decide(ledger, SettleSale("s", "A"), T0 + 6) == []  # idempotent


def test_sale_past_its_window_can_be_settled_without_close():
    ledger = sold(1)
    (settled,) = decide(ledger, SettleSale("s", "A"), TERMS.ends_at_ms)
    assert isinstance(settled, SaleSettled) and settled.remaining == 2


def test_settled_state_survives_pack_and_unpack_in_chunks():
    digests = frozenset(range(150_000))
    event = SaleSettled("s", "A", (), digests, sequence=42, remaining=7)
    chunks = pack_settled(event)
    assert len(chunks) == 3 and all(len(c) < 1_000_000 for c in chunks)
    assert unpack_settled(chunks) == (42, 7, digests)


def test_writer_deletes_forgotten_decisions_and_rebuilds_the_settled_sale():
    reg = SchemaRegistry.load_default()

    def env(i: Any) -> dict[str, Any]:
        return {"event_id": f"e{i}", "correlation_id": None, "producer": "t", "occurred_at": 0}

    def intent(i: int) -> bytes:
        body = {"intent_id": f"i{i}", "idempotency_key": "k", "user_id": f"u{i}",
                "sale_id": "s", "sku": "A", "quantity": 1}  # fmt: skip
        return reg.encode("PurchaseIntent", {**env(i), **body})

    opened = reg.encode("SaleOpened", {**env("o"), "sale_id": "s", "sku": "A", "allocation": 3,
                                       "per_user_limit": 2, "per_order_max": 2,
                                       "starts_at": T0, "ends_at": T0 + 10_000})  # fmt: skip
    w = SkuWriter(reg)
    w.stale = False
    tables: dict[str, dict[str, bytes]] = {SkuWriter.DECISIONS: {}, SkuWriter.SALES: {}}

    def apply(value: bytes, t: int) -> Any:
        out = w.handle(value, t)
        for table, key, v in out.table_writes:
            if v is None:
                tables[table].pop(key)
            else:
                tables[table][key] = v
        return out

    apply(opened, T0)
    first = [apply(intent(i), T0 + 1).decisions for i in range(4)]
    apply(reg.encode("SaleClosed", {**env("c"), "sale_id": "s", "sku": "A", "reason": "r"}), T0 + 2)
    apply(reg.encode("SaleSettled", {**env("x"), "sale_id": "s", "sku": "A"}), T0 + 3)
    assert tables[SkuWriter.DECISIONS] == {}, "every decided intent was deleted"
    assert all(len(d) == 1 for d in first)

    rebuilt = SkuWriter(reg)
    rebuilt.rebuild(tables[SkuWriter.DECISIONS].values(), tables[SkuWriter.SALES].items())
    assert rebuilt.handle(intent(0), T0 + 4).decisions == []
    name, record = reg.decode(rebuilt.handle(intent(9), T0 + 4).decisions[0][1])
    assert (name, record["reason"], record["sequence"]) == ("IntentRejected", "SALE_ENDED", 5)
    assert rebuilt.ledger("A").sales["s"].remaining == 0
