"""The operator's controls in the decision core: pause, resume, added units, cancel.

Each test drives the core with a short log and checks the facts by name, what they carry,
that the sale audit (rules re-decided, lifecycle, remaining) passes, and that a forged copy
of the log fails it; the writer's store keeps what they change across a reload.
"""

from __future__ import annotations

from dataclasses import replace

from processors.core import (
    AddUnits,
    CancelSale,
    CloseSale,
    Command,
    Event,
    OpenSale,
    PauseSale,
    PlaceIntent,
    RecordPayment,
    ResumeSale,
    ReturnUnits,
    SaleTerms,
    SettleSale,
    SkuLedger,
    StartPayment,
    Tick,
)
from tests.unit.test_lifecycle import audited
from tests.unit.test_prequeue import run
from tests.unit.writer_fakes import MemoryStore, assert_same_state, loaded, log_of, persist

HOLD = 10_000
TERMS = SaleTerms("s", "A", 2, 1, 1, 0, 1_000_000, hold_ms=HOLD, waitlist_depth=3)


def names(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def place(n: int) -> PlaceIntent:
    return PlaceIntent(f"i{n}", f"u{n}", "s", "A", 1)


def test_a_paused_sale_defers_intents_in_order_and_decides_them_on_resume() -> None:
    ledger = SkuLedger("A")
    events = run([(0, OpenSale(TERMS)), (10, place(1)), (20, PauseSale("s", "A")),
                  (30, place(2)), (40, place(3)), (41, place(2)),  # a repeat: nothing
                  (45, PauseSale("s", "A")),  # paused already: nothing
                  (50, Tick("A")), (60, ResumeSale("s", "A")),
                  (70, ResumeSale("s", "A"))], ledger)  # fmt: skip
    assert names(events) == ["SaleOpened", "IntentAccepted", "SalePaused", "IntentDeferred",
                             "IntentDeferred", "SaleResumed", "IntentAccepted",
                             "Waitlisted"]  # fmt: skip
    deferred, resumed = events[3], events[5]
    assert (deferred.position, resumed.waiting) == (1, 2)  # type: ignore[union-attr]
    # Decided at the resume's log time, in arrival order: i2 took the last unit, i3 waits.
    assert [(e.intent_id, e.decided_at) for e in events[6:]] == [("i2", 60), ("i3", 60)]  # type: ignore[union-attr]
    assert not ledger.sales["s"].paused and audited(events) == []


def test_resume_decides_the_deferred_by_the_rules_at_that_time() -> None:
    ledger = SkuLedger("A")
    events = run([(0, OpenSale(TERMS)), (10, place(1)), (11, place(2)),
                  (20, PauseSale("s", "A")), (30, place(3)), (31, place(4)), (32, place(5)),
                  (33, place(6)), (60, ResumeSale("s", "A"))], ledger)  # fmt: skip
    after = events[events.index(next(e for e in events if names([e]) == ["SaleResumed"])) :]
    # Sold out but held units may come back: three wait on the waitlist, the fourth is
    # beyond its depth.
    assert names(after) == ["SaleResumed", "Waitlisted", "Waitlisted", "Waitlisted",
                            "IntentRejected"]  # fmt: skip
    assert audited(events) == []


def test_a_pause_ends_with_the_sale_close_tick_or_settlement_and_never_loses_one() -> None:
    short = replace(TERMS, ends_at_ms=100)
    closing = run([(0, OpenSale(short)), (10, PauseSale("s", "A")), (20, place(1)),
                   (30, CloseSale("s", "A"))])  # fmt: skip
    assert names(closing)[-3:] == ["SaleClosed", "SaleResumed", "IntentRejected"]
    assert closing[-1].reason == "SALE_ENDED"  # type: ignore[union-attr]
    ticked = run([(0, OpenSale(short)), (10, PauseSale("s", "A")), (20, place(1)),
                  (99, Tick("A")), (100, Tick("A")), (101, Tick("A"))])  # fmt: skip
    assert names(ticked)[-2:] == ["SaleResumed", "IntentRejected"]
    assert ticked[-1].decided_at == 100  # type: ignore[union-attr]
    ledger = SkuLedger("A")
    settled = run([(0, OpenSale(short)), (10, PauseSale("s", "A")), (20, place(1)),
                   (200, SettleSale("s", "A"))], ledger)  # the clock never ticked  # fmt: skip
    assert names(settled)[-3:] == ["SaleResumed", "IntentRejected", "SaleSettled"]
    assert settled[-1].intents == 1  # type: ignore[union-attr]
    for events in (closing, ticked, settled):
        assert audited(events) == []
    refused = run([(0, OpenSale(short)), (200, PauseSale("s", "A"))])
    assert "over" in refused[-1].detail  # type: ignore[union-attr]


def test_added_units_go_to_the_waitlist_once_per_ref_and_lift_the_return_cap() -> None:
    ledger = SkuLedger("A")
    events = run([(0, OpenSale(TERMS)), (10, place(1)), (11, place(2)), (12, place(3)),
                  (20, AddUnits("s", "A", 2, "add-1")), (21, AddUnits("s", "A", 2, "add-1")),
                  (22, place(4)), (30, StartPayment("s", "A", "ord-i1", "u1", "a1")),
                  (31, RecordPayment("s", "A", "ord-i1", "a1", True)),
                  (40, ReturnUnits("s", "A", 5, "back-1"))], ledger)  # fmt: skip
    assert names(events) == ["SaleOpened", "IntentAccepted", "IntentAccepted", "Waitlisted",
                             "UnitsAdded", "IntentAccepted", "IntentAccepted",
                             "PaymentStarted", "OrderPaid", "UnitsReturned"]  # fmt: skip
    added = events[4]
    assert (added.allocation, added.remaining) == (4, 2)  # type: ignore[union-attr]
    # One unit is paid (out for good); three are held: only the paid one can be returned.
    assert events[-1].quantity == 1  # type: ignore[union-attr]
    assert ledger.sales["s"].added == 2 and audited(events) == []


def test_cancel_releases_holds_refunds_paid_orders_and_tells_everyone_waiting() -> None:
    ledger = SkuLedger("A")
    steps: list[tuple[int, Command]] = [
        (0, OpenSale(TERMS)), (10, place(1)), (11, place(2)), (12, place(3)),  # 3 waits
        (20, StartPayment("s", "A", "ord-i1", "u1", "a1")),
        (21, RecordPayment("s", "A", "ord-i1", "a1", True)),  # i1 paid
        (22, StartPayment("s", "A", "ord-i2", "u2", "a2")),  # i2 paying
        (30, PauseSale("s", "A")), (31, place(4)),  # deferred
        (40, CancelSale("s", "A", "mispriced")),
        (50, RecordPayment("s", "A", "ord-i2", "a2", True)),  # charged after the cancel
        (60, CancelSale("s", "A", "again")), (70, ResumeSale("s", "A")), (80, place(5)),
    ]  # fmt: skip
    events = run(steps, ledger)
    cancel_at = names(events).index("SaleCancelled")
    assert names(events)[cancel_at:] == ["SaleCancelled", "HoldCancelled", "OrderRefunded",
                                         "IntentRejected", "SaleResumed", "IntentRejected",
                                         "PaymentVoided", "IntentRejected"]  # fmt: skip
    refund = events[cancel_at + 2]
    assert (refund.order_id, refund.attempt_id) == ("ord-i1", "a1")  # type: ignore[union-attr]
    assert events[-1].reason == "SALE_ENDED"  # type: ignore[union-attr]
    book = ledger.sales["s"]
    assert (book.remaining, book.holds, book.paid) == (2, {}, {})
    assert book.orders == {"ord-i1": "refunded", "ord-i2": "cancelled"}
    assert audited(events) == []
    # Forged: a refund of an order that was never paid; a cancel that kept a hold.
    forged = [replace(e, order_id="ord-i2") if e is refund else e for e in events]  # type: ignore[call-arg]
    assert any("refunded an order" in v for v in audited(forged))
    kept = [e for e in events if names([e]) != ["HoldCancelled"]]
    assert any(v.startswith(("rules-mismatch", "sequence-gap")) for v in audited(kept))


def test_deferred_decided_out_of_order_is_a_rules_mismatch() -> None:
    events = run([(0, OpenSale(TERMS)), (10, PauseSale("s", "A")), (20, place(1)),
                  (21, place(2)), (30, ResumeSale("s", "A"))])  # fmt: skip
    a, b = events[-2], events[-1]
    swapped = [
        *events[:-2],
        replace(b, sequence=a.sequence, remaining=a.remaining),  # type: ignore[type-var]
        replace(a, sequence=b.sequence, remaining=b.remaining),
    ]  # type: ignore[type-var]
    assert audited(events) == []
    assert any(v.startswith("rules-mismatch") for v in audited(swapped))


def test_the_writer_store_keeps_pauses_deferred_intents_added_units_and_paid_orders() -> None:
    log = log_of([(0, OpenSale(TERMS)), (10, place(1)),
                  (20, StartPayment("s", "A", "ord-i1", "u1", "a1")),
                  (21, RecordPayment("s", "A", "ord-i1", "a1", True)),
                  (30, AddUnits("s", "A", 1, "add-1")), (40, PauseSale("s", "A")),
                  (50, place(2)), (51, place(3)), (60, CancelSale("s", "A", "test"))])  # fmt: skip
    from processors.writer import PartitionWriter
    from tests.unit.writer_fakes import REGISTRY

    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    for first in range(0, 8, 2):  # batches of two, the cancel left for after a reload
        persist(writer, store, log.between(first, first + 2), committed=first)
    again = loaded(store.copy(), 8)
    assert_same_state(again.ledgers, writer.ledgers)
    book = again.ledgers["A"].sales["s"]
    assert book.paused and book.added == 1 and [d[0] for d in book.deferred] == ["i2", "i3"]
    assert set(book.paid) == {"ord-i1"}
    result = again.handle_batch(log.between(8, 9), 8)
    fact_names = [REGISTRY.decode(v)[0] for _, v in result.events]
    assert fact_names == ["SaleCancelled", "OrderRefunded", "SaleResumed", "IntentRejected",
                          "IntentRejected"]  # fmt: skip


def test_an_intent_past_the_end_of_a_paused_sale_is_decided_after_those_that_waited() -> None:
    short = replace(TERMS, ends_at_ms=100)
    events = run([(0, OpenSale(short)), (10, PauseSale("s", "A")), (20, place(1)),
                  (150, place(2))])  # the sale ended, and no tick came  # fmt: skip
    assert [(type(e).__name__, getattr(e, "intent_id", None)) for e in events[-3:]] == [
        ("SaleResumed", None), ("IntentRejected", "i1"), ("IntentRejected", "i2")]  # fmt: skip
    assert audited(events) == []


def test_a_pause_before_the_start_is_refused_and_a_settled_sale_refuses_a_cancel() -> None:
    later = replace(TERMS, starts_at_ms=1_000)
    early = run([(0, OpenSale(later)), (10, PauseSale("s", "A"))])
    assert names(early)[-1] == "SaleRefused" and "not started" in early[-1].detail  # type: ignore[union-attr]
    # Cancelled and settled: a repeated cancel is refused alike live and after a reload
    # (a settled book's state keeps no "cancelled").
    settled = run([(0, OpenSale(TERMS)), (10, CancelSale("s", "A", "x")),
                   (20, SettleSale("s", "A")), (30, CancelSale("s", "A", "again"))])  # fmt: skip
    assert names(settled)[-2:] == ["SaleSettled", "SaleRefused"]
