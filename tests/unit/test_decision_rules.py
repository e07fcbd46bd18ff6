"""Readable examples of each decision rule."""

from __future__ import annotations

import copy

import pytest

from processors.core import (
    RULES,
    CloseSale,
    IntentAccepted,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    RejectionReason,
    ReturnUnits,
    SaleClosed,
    SaleOpened,
    SaleRefused,
    SaleTerms,
    SkuLedger,
    UnitsReturned,
    WrongLedger,
)
from tests.unit.core_steps import step

SKU = "SKU-1"
START, END = 1_000, 2_000
TERMS = SaleTerms(
    "sale-1",
    SKU,
    allocation=5,
    per_user_limit=3,
    per_order_max=2,
    starts_at_ms=START,
    ends_at_ms=END,
)


def opened(terms: SaleTerms = TERMS) -> SkuLedger:
    ledger = SkuLedger(SKU)
    assert step(ledger, OpenSale(terms), 0) == [SaleOpened(terms, 1, 0)]
    return ledger


def place(
    ledger: SkuLedger,
    intent: str,
    user: str = "u1",
    qty: int = 1,
    t: int = START,
    sale: str = "sale-1",
) -> IntentAccepted | IntentRejected:
    [event] = step(ledger, PlaceIntent(intent, user, sale, SKU, qty), t)
    assert isinstance(event, IntentAccepted | IntentRejected)
    return event


def reason(event: object) -> RejectionReason:
    assert isinstance(event, IntentRejected)
    return event.reason


def test_accept_takes_units_and_numbers_the_decision() -> None:
    ledger = opened()
    event = place(ledger, "i1", qty=2)
    assert event == IntentAccepted("i1", "sale-1", SKU, "u1", 2, "ord-i1", 3, 2, START)
    assert ledger.sales["sale-1"].remaining == 3
    assert ledger.sales["sale-1"].bought == {"u1": 2}


def test_a_repeated_intent_yields_no_event_and_changes_nothing() -> None:
    ledger = opened()
    place(ledger, "i1", qty=2)
    before = copy.deepcopy(ledger)
    assert step(ledger, PlaceIntent("i1", "u1", "sale-1", SKU, 2), START + 5) == []
    assert ledger == before
    assert ledger.sales["sale-1"].sequence == 2 and ledger.sales["sale-1"].remaining == 3


def test_a_repeated_intent_id_with_another_payload_is_still_a_repeat() -> None:
    ledger = opened()
    step(ledger, OpenSale(SaleTerms("sale-2", SKU, 5, 3, 2, START, END)), 0)
    place(ledger, "i1", qty=1)
    before = copy.deepcopy(ledger)
    for forged in (
        PlaceIntent("i1", "u2", "sale-1", SKU, 2),
        PlaceIntent("i1", "u1", "sale-2", SKU, 1),
        PlaceIntent("i1", "u1", "nope", SKU, 1),
    ):
        assert step(ledger, forged, START + 1) == []
    assert ledger == before


def test_unknown_sale() -> None:
    ledger = opened()
    first = place(ledger, "i1", sale="nope")
    assert reason(first) is RejectionReason.UNKNOWN_SALE
    assert ledger.orphans == {"i1"}
    assert step(ledger, PlaceIntent("i1", "u1", "nope", SKU, 1), START) == []
    assert ledger.orphan_sequences == {"nope": 1} and ledger.sales["sale-1"].sequence == 1


@pytest.mark.parametrize("qty", [0, -1])
def test_invalid_quantity(qty: int) -> None:
    assert reason(place(opened(), "i1", qty=qty)) is RejectionReason.INVALID_QUANTITY


def test_order_max_exceeded() -> None:
    assert reason(place(opened(), "i1", qty=3)) is RejectionReason.ORDER_MAX_EXCEEDED


def test_sale_not_open_before_start() -> None:
    assert reason(place(opened(), "i1", t=START - 1)) is RejectionReason.SALE_NOT_OPEN


def test_sale_ended_at_end_or_when_closed() -> None:
    assert reason(place(opened(), "i1", t=END)) is RejectionReason.SALE_ENDED
    ledger = opened()
    [closed] = step(ledger, CloseSale("sale-1", SKU), START)
    assert closed == SaleClosed("sale-1", SKU, 5, 2, START)
    assert step(ledger, CloseSale("sale-1", SKU), START) == []  # idempotent
    assert reason(place(ledger, "i1")) is RejectionReason.SALE_ENDED


def test_sold_out() -> None:
    ledger = opened()
    for n, user in enumerate(["a", "a", "b", "b", "c"]):
        assert isinstance(place(ledger, f"i{n}", user=user), IntentAccepted)
    rejected = place(ledger, "late", user="d")
    assert reason(rejected) is RejectionReason.SOLD_OUT
    assert isinstance(rejected, IntentRejected) and rejected.remaining == 0


def test_user_limit() -> None:
    ledger = opened()
    place(ledger, "i1", qty=2)
    assert reason(place(ledger, "i2", qty=2)) is RejectionReason.USER_LIMIT
    assert isinstance(place(ledger, "i3", qty=1), IntentAccepted)


def test_insufficient_stock() -> None:
    ledger = opened()
    place(ledger, "i1", user="a", qty=2)
    place(ledger, "i2", user="b", qty=2)
    assert reason(place(ledger, "i3", user="c", qty=2)) is RejectionReason.INSUFFICIENT_STOCK


def test_rejections_take_a_sequence_number_too_counted_per_sale_and_sku() -> None:
    ledger = opened()
    events = [place(ledger, "i1", qty=9), place(ledger, "i2"), place(ledger, "i3", sale="x"),
              place(ledger, "i4"), place(ledger, "i5", sale="x")]  # fmt: skip
    assert [(e.sale_id, e.sequence) for e in events] == [
        ("sale-1", 2), ("sale-1", 3), ("x", 1), ("sale-1", 4), ("x", 2),
    ]  # fmt: skip
    # A sale opened under an id that already had UNKNOWN_SALE rejections continues their count.
    [opened_x] = step(ledger, OpenSale(SaleTerms("x", SKU, 5, 3, 2, START, END)), START)
    assert opened_x.sequence == 3
    assert place(ledger, "i6", sale="x").sequence == 4


def test_open_sale_replay_conflict_and_invalid_terms() -> None:
    ledger = opened()
    assert step(ledger, OpenSale(TERMS), 0) == []
    [conflict] = step(ledger, OpenSale(SaleTerms("sale-1", SKU, 99, 1, 1, 0, 5)), 0)
    assert isinstance(conflict, SaleRefused) and ledger.sales["sale-1"].terms == TERMS
    assert conflict.sequence == 2 and ledger.sales["sale-1"].sequence == 2
    [invalid] = step(ledger, OpenSale(SaleTerms("sale-2", SKU, 1, 1, 1, 5, 5)), 0)
    assert isinstance(invalid, SaleRefused) and "sale-2" not in ledger.sales
    assert invalid.sequence == 1 and ledger.orphan_sequences == {"sale-2": 1}
    [unknown_rules] = step(ledger, OpenSale(SaleTerms("sale-3", SKU, 1, 1, 1, 0, 5, rules=99)), 0)
    assert isinstance(unknown_rules, SaleRefused) and "rules version 99" in unknown_rules.detail
    assert "sale-3" not in ledger.sales


def test_a_sale_is_judged_by_the_rules_version_it_opened_under(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A later version (here: no per-user limit) must not change how a v1 sale decides.
    monkeypatch.setitem(RULES, 2, lambda book, cmd, now: None)
    ledger = opened()
    step(ledger, OpenSale(SaleTerms("sale-2", SKU, 5, 1, 2, START, END, rules=2)), 0)
    place(ledger, "a1", qty=2)
    assert reason(place(ledger, "a2", qty=2)) is RejectionReason.USER_LIMIT  # v1
    place(ledger, "b1", qty=2, sale="sale-2")
    assert isinstance(place(ledger, "b2", qty=2, sale="sale-2"), IntentAccepted)  # v2


def test_return_units_is_idempotent_and_capped_at_units_out() -> None:
    ledger = opened()
    place(ledger, "i1", qty=2)
    [back] = step(ledger, ReturnUnits("sale-1", SKU, 5, "hold-1"), START + 1)
    assert back == UnitsReturned("sale-1", SKU, "hold-1", 5, 2, 5, 3, START + 1)
    before = copy.deepcopy(ledger)
    assert step(ledger, ReturnUnits("sale-1", SKU, 5, "hold-1"), START + 2) == []
    assert ledger == before
    [none_out] = step(ledger, ReturnUnits("sale-1", SKU, 1, "hold-2"), START + 3)
    assert isinstance(none_out, UnitsReturned) and none_out.quantity == 0
    assert ledger.sales["sale-1"].remaining == TERMS.allocation


def test_command_for_another_sku_is_a_routing_bug() -> None:
    with pytest.raises(WrongLedger):
        step(opened(), PlaceIntent("i1", "u1", "sale-1", "OTHER", 1), START)
