"""The order lifecycle (holds, payments, expiry, cancellation, the waitlist and the operator's
pause, resume, added units and cancel) against a reference model.

The model below restates the rules in the plainest terms (a dict per order with its state)
and shares no code with ``processors.core.lifecycle``; hypothesis drives both with the same
random commands at increasing log times and compares what each says after every command.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.core import (
    AddUnits,
    CancelHold,
    CancelSale,
    CloseSale,
    Command,
    Event,
    OpenSale,
    PauseSale,
    PlaceIntent,
    RecordPayment,
    ResumeSale,
    SaleTerms,
    SettleSale,
    SkuLedger,
    StartPayment,
    Tick,
    decide,
    evolve,
    terms_problem,
)

HOLD, GRACE, LIMIT, DEPTH = 10_000, 2_000, 2, 2
USERS = ["u0", "u1", "u2", "u3"]


def terms(allocation: int) -> SaleTerms:
    return SaleTerms("s", "A", allocation, LIMIT, 2, 0, 10**12, hold_ms=HOLD, pay_grace_ms=GRACE,
                     waitlist_depth=DEPTH)  # fmt: skip


@dataclass
class Model:
    """What the rules say, order by order."""

    remaining: int
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, str] = field(default_factory=dict)
    bought: Counter[str] = field(default_factory=Counter)
    charges: int = 0
    waitlist: list[tuple[str, str, int]] = field(default_factory=list)
    paused: bool = False
    deferred: list[tuple[str, str, int]] = field(default_factory=list)
    cancelled: bool = False
    added: int = 0
    refs: set[str] = field(default_factory=set)

    def held(self) -> int:
        return sum(1 for o in self.orders.values() if o["state"] == "held")

    def hold(self, intent: str, user: str, q: int, now: int) -> None:
        self.remaining -= q
        self.bought[user] += q
        self.orders["ord-" + intent] = {"user": user, "q": q, "pay_by": now + HOLD,
                                        "state": "held", "attempt": None}  # fmt: skip

    def serve(self, out: list[str], now: int) -> list[str]:
        """After a command that may have brought units back or left no hold: the line moves."""
        if not out:
            return out
        waiting, self.waitlist = self.waitlist, []
        for intent, user, q in waiting:  # whoever fits, in line order; the others wait on
            if q > self.remaining:
                self.waitlist.append((intent, user, q))
            elif self.bought[user] + q > LIMIT:
                out.append("IntentRejected")
            else:
                self.hold(intent, user, q, now)
                out.append("IntentAccepted")
        if not self.held():
            out += ["IntentRejected"] * len(self.waitlist)  # nothing can come back
            self.waitlist = []
        return out

    def overdue(self, order: dict[str, Any], now: int) -> bool:
        if order["attempt"] is None:
            return now >= order["pay_by"]
        return now > order["pay_by"] + GRACE

    def release(self, order: dict[str, Any], state: str) -> None:
        order["state"] = state
        self.remaining += order["q"]

    def place(self, intent: str, user: str, q: int, now: int) -> list[str]:
        if self.cancelled:
            return ["IntentRejected"]
        if self.paused:
            self.deferred.append((intent, user, q))
            return ["IntentDeferred"]
        if self.remaining >= q and self.bought[user] + q <= LIMIT:
            self.hold(intent, user, q, now)
            return ["IntentAccepted"]
        if (self.remaining < q and self.bought[user] + q <= LIMIT and self.held()
                and len(self.waitlist) < DEPTH):  # fmt: skip
            self.waitlist.append((intent, user, q))
            return ["Waitlisted"]
        return ["IntentRejected"]

    def tick(self, now: int) -> list[str]:
        out = []
        for order in sorted(self.orders.values(), key=lambda o: o["pay_by"]):
            if order["state"] == "held" and self.overdue(order, now):
                self.release(order, "expired")
                out.append("HoldExpired")
        return self.serve(out, now)

    def start(self, order_id: str, user: str, attempt: str, now: int) -> list[str]:
        if attempt in self.attempts:
            return []
        order = self.orders.get(order_id)
        refused = ["OrderRefused"]
        if order is None or order["state"] != "held" or order["user"] != user:
            self.attempts[attempt] = "refused"
            return refused
        if order["attempt"] is not None:
            self.attempts[attempt] = "refused"
            return refused
        if now >= order["pay_by"]:
            self.release(order, "expired")
            self.attempts[attempt] = "refused"
            return self.serve(["HoldExpired", *refused], now)
        order["attempt"] = attempt
        self.attempts[attempt] = "started"
        return ["PaymentStarted"]

    def record(self, order_id: str, attempt: str, ok: bool, now: int) -> list[str]:
        state = self.attempts.get(attempt)
        if state not in (None, "started"):
            return []
        order = self.orders.get(order_id)
        mine = order is not None and order["state"] == "held" and order["attempt"] == attempt
        if not ok:
            if state is None:
                return []
            self.attempts[attempt] = "declined"
            if mine:
                order["attempt"] = None  # type: ignore[index]
            return ["PaymentDeclined"]
        self.charges += 1  # the provider took the money: paid or refunded, nothing else
        self.attempts[attempt] = "voided"
        if state is None or not mine:
            return ["PaymentVoided"]
        assert order is not None
        if now <= order["pay_by"] + GRACE:
            order["state"] = "paid"
            self.attempts[attempt] = "paid"
            return self.serve(["OrderPaid"], now)
        self.release(order, "expired")
        return self.serve(["PaymentVoided", "HoldExpired"], now)

    def pause(self) -> list[str]:
        if self.paused:
            return []
        if self.cancelled:
            return ["SaleRefused"]
        self.paused = True
        return ["SalePaused"]

    def resume(self, now: int) -> list[str]:
        if not self.paused:
            return []
        self.paused, waiting, self.deferred = False, self.deferred, []
        out = ["SaleResumed"]
        for intent, user, q in waiting:  # as if each arrived now, in arrival order
            out += self.place(intent, user, q, now)
        return out

    def add(self, q: int, ref: str, now: int) -> list[str]:
        if ref in self.refs:
            return []
        if self.cancelled:
            return ["SaleRefused"]
        self.refs.add(ref)
        self.remaining += q
        self.added += q
        return self.serve(["UnitsAdded"], now)

    def cancel_sale(self) -> list[str]:
        if self.cancelled:
            return []
        self.cancelled = True
        out = ["SaleCancelled"]
        for order_id in sorted(self.orders, key=lambda o: (self.orders[o]["pay_by"], o)):
            if self.orders[order_id]["state"] == "held":
                self.release(self.orders[order_id], "cancelled")
                out.append("HoldCancelled")
        for order_id in sorted(self.orders):
            if self.orders[order_id]["state"] == "paid":
                self.release(self.orders[order_id], "refunded")
                out.append("OrderRefunded")
        out += ["IntentRejected"] * len(self.waitlist)
        self.waitlist = []
        if self.paused:
            out += ["SaleResumed", *["IntentRejected"] * len(self.deferred)]
            self.paused, self.deferred = False, []
        return out

    def cancel(self, order_id: str, user: str, now: int) -> list[str]:
        order = self.orders.get(order_id)
        if order is not None and order["state"] == "cancelled":
            return []
        if order is None or order["state"] != "held" or order["user"] != user:
            return ["OrderRefused"]
        if order["attempt"] is not None:
            return ["OrderRefused"]
        self.release(order, "cancelled")
        return self.serve(["HoldCancelled"], now)


PAY = st.one_of(
    st.tuples(st.just("start"), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("record"), st.integers(0, 9), st.booleans()),
)
OP = st.one_of(
    st.tuples(st.just("place"), st.sampled_from(USERS), st.integers(1, 2)),
    PAY,
    PAY,  # payments as often as the rest: a paid order is several steps in the making
    st.tuples(st.just("cancel"), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("tick")),
    # The operator, now and then (one_of flattens: a branch of its own, not four):
    # 0-2 pause, 3-5 resume, 6-8 add units, 9 cancel the sale, else a tick.
    st.tuples(st.just("operator"), st.integers(0, 15), st.integers(1, 2)),
)


def _apply(ledger: SkuLedger, command: Command, now: int) -> list[Event]:
    events = decide(ledger, command, now)
    for event in events:
        evolve(ledger, event)
    return events


@settings(max_examples=300, deadline=None)
@given(
    allocation=st.integers(1, 5),
    # Steps of whole seconds: deadlines (10 s, grace 2 s) are hit exactly, not only passed.
    steps=st.lists(
        st.tuples(st.sampled_from([0, 1_000, 2_000, 5_000]), OP), min_size=20, max_size=80
    ),
)
def test_the_lifecycle_follows_the_reference_model(
    allocation: int, steps: list[tuple[int, tuple[Any, ...]]]
) -> None:
    ledger, model = SkuLedger("A"), Model(allocation)
    opened = _apply(ledger, OpenSale(terms(allocation)), 0)
    now, placed, attempts = 0, 0, []
    all_events: list[Event] = []
    for dt, op in steps:
        now += dt
        orders = sorted(model.orders)
        picks = orders and op[0] in ("start", "record", "cancel")
        held = [o for o in orders if model.orders[o]["state"] == "held"]
        if picks and held and op[1] < 7:  # mostly an order that can still move, or any
            orders = held
        pick = orders[op[1] % len(orders)] if picks else "ord-none"
        owner = model.orders[pick]["user"] if pick in model.orders else "nobody"
        if op[0] == "place":
            placed += 1
            cmd: Command = PlaceIntent(f"i{placed:03d}", op[1], "s", "A", op[2])
            want = model.place(f"i{placed:03d}", op[1], op[2], now)
        elif op[0] == "start":
            attempt = f"a{len(attempts)}"
            attempts.append((pick, attempt))
            user = owner if op[2] else "intruder"
            cmd, want = (
                StartPayment("s", "A", pick, user, attempt),
                model.start(pick, user, attempt, now),
            )
        elif op[0] == "record":
            # a started attempt's result (maybe again), or one the writer never saw started
            started = [a for a in attempts if model.attempts.get(a[1]) == "started"]
            pool = started if started and op[1] < 7 else attempts
            order, attempt = pool[op[1] % len(pool)] if pool else (pick, "a-never")
            ok = op[2] or op[1] % 3 == 0
            cmd = RecordPayment("s", "A", order, attempt, ok)
            want = model.record(order, attempt, ok, now)
        elif op[0] == "cancel":
            user = owner if op[2] else "intruder"
            cmd, want = CancelHold("s", "A", pick, user), model.cancel(pick, user, now)
        elif op[0] == "operator" and op[1] < 3:
            cmd, want = PauseSale("s", "A"), model.pause()
        elif op[0] == "operator" and op[1] < 6:
            cmd, want = ResumeSale("s", "A"), model.resume(now)
        elif op[0] == "operator" and op[1] < 9:
            ref = f"r{op[1] % 2}{op[2]}"
            cmd, want = AddUnits("s", "A", op[2], ref), model.add(op[2], ref, now)
        elif op[0] == "operator" and op[1] == 9:
            cmd, want = CancelSale("s", "A", "test"), model.cancel_sale()
        else:
            cmd, want = Tick("A"), model.tick(now)
        got = _apply(ledger, cmd, now)
        all_events += got
        assert [type(e).__name__ for e in got] == want, (cmd, got)
        book = ledger.sales["s"]
        held = {o for o, m in model.orders.items() if m["state"] == "held"}
        assert set(book.holds) == held
        assert book.orders == {o: m["state"] for o, m in model.orders.items() if o not in held}
        assert book.remaining == model.remaining
        assert book.waitlist == model.waitlist
        assert [d[0] for d in book.deferred] == [d[0] for d in model.deferred]
        assert (book.paused, book.cancelled) == (model.paused, model.cancelled)
        # Every unit in exactly one place: for sale, held or paid.
        paid = sum(m["q"] for m in model.orders.values() if m["state"] == "paid")
        held_units = sum(h.quantity for h in book.holds.values())
        assert book.remaining + held_units + paid == allocation + model.added
    names = Counter(type(e).__name__ for e in all_events)
    paid_now = sum(1 for m in model.orders.values() if m["state"] == "paid")
    # The provider's charges: orders paid, and refunds (voided, or of a cancelled sale).
    assert model.charges == paid_now + names["PaymentVoided"] + names["OrderRefunded"]
    sequences = [e.sequence for e in all_events]
    assert sequences == list(range(2, 2 + len(all_events)))  # after SaleOpened, gap-free
    assert audited([*opened, *all_events]) == []  # and the audit finds nothing wrong


def audited(events: list[Event]) -> list[str]:
    """The sale audit's violations (kind: detail) of ``events`` as records."""
    from flashsale.sale_audit import SaleAudit, _check_events
    from processors.records import record_name, to_record

    items = [(record_name(e), to_record(e)) for e in events]
    out = SaleAudit("s")
    _check_events(out, {r["sku"]: r for n, r in items if n == "SaleOpened"}, items)
    return [f"{v.kind}: {v.detail}" for v in out.violations]


def _paid_and_expired() -> list[Event]:
    ledger, events = SkuLedger("A"), []
    for at, cmd in [(0, OpenSale(terms(2))), (100, PlaceIntent("i1", "u0", "s", "A", 1)),
                    (100, PlaceIntent("i2", "u1", "s", "A", 1)),
                    (200, StartPayment("s", "A", "ord-i1", "u0", "a1")),
                    (300, RecordPayment("s", "A", "ord-i1", "a1", True)),
                    (100 + HOLD, Tick("A"))]:  # fmt: skip
        events += _apply(ledger, cmd, at)
    assert [type(e).__name__ for e in events[-3:]] == ["PaymentStarted", "OrderPaid",
                                                       "HoldExpired"]  # fmt: skip
    return events


def test_the_audit_names_a_late_payment_an_early_expiry_and_a_revived_hold() -> None:
    from dataclasses import replace

    events = _paid_and_expired()
    assert audited(events) == []
    late = [replace(e, decided_at=100 + HOLD + GRACE + 1) if type(e).__name__ == "OrderPaid"
            else e for e in events]  # fmt: skip
    assert any("after the deadline" in v for v in audited(late))
    early = [replace(e, decided_at=100 + HOLD - 1) if type(e).__name__ == "HoldExpired"
             else e for e in events]  # fmt: skip
    assert any("before its deadline" in v for v in audited(early))
    paid, expired = events[-2], events[-1]
    revived = [*events, replace(paid, order_id=expired.order_id, sequence=expired.sequence + 1)]  # type: ignore[union-attr]
    found = audited(revived)
    assert any("paid an order expired" in v for v in found), found
    assert any(v.startswith("rules-mismatch") for v in found)


def test_a_payment_started_in_time_may_finish_within_the_grace_and_not_after() -> None:
    ledger = SkuLedger("A")
    _apply(ledger, OpenSale(terms(2)), 0)
    _apply(ledger, PlaceIntent("i1", "u0", "s", "A", 1), 100)
    _apply(ledger, PlaceIntent("i2", "u1", "s", "A", 1), 100)
    assert [h.pay_by for h in ledger.sales["s"].holds.values()] == [100 + HOLD] * 2
    for order, user, attempt in (("ord-i1", "u0", "a1"), ("ord-i2", "u1", "a2")):
        started = _apply(ledger, StartPayment("s", "A", order, user, attempt), 100 + HOLD - 1)
        assert [type(e).__name__ for e in started] == ["PaymentStarted"]
    assert _apply(ledger, Tick("A"), 100 + HOLD + GRACE) == []  # in progress: not yet
    paid = _apply(ledger, RecordPayment("s", "A", "ord-i1", "a1", True), 100 + HOLD + GRACE)
    assert [type(e).__name__ for e in paid] == ["OrderPaid"]
    late = _apply(ledger, RecordPayment("s", "A", "ord-i2", "a2", True), 100 + HOLD + GRACE + 1)
    assert [type(e).__name__ for e in late] == ["PaymentVoided", "HoldExpired"]
    assert _apply(ledger, RecordPayment("s", "A", "ord-i2", "a2", True), 10**9) == []  # once
    book = ledger.sales["s"]
    assert book.orders == {"ord-i1": "paid", "ord-i2": "expired"} and book.remaining == 1


def test_a_sale_with_a_hold_outstanding_does_not_settle_and_terms_are_checked() -> None:
    ledger = SkuLedger("A")
    _apply(ledger, OpenSale(terms(1)), 0)
    _apply(ledger, PlaceIntent("i1", "u0", "s", "A", 1), 1)
    _apply(ledger, CloseSale("s", "A"), 2)
    refused = _apply(ledger, SettleSale("s", "A"), 3)
    assert [type(e).__name__ for e in refused] == ["SaleRefused"]
    assert "holds outstanding" in refused[0].detail  # type: ignore[union-attr]
    assert [type(e).__name__ for e in _apply(ledger, Tick("A"), 1 + HOLD)] == ["HoldExpired"]
    assert [type(e).__name__ for e in _apply(ledger, SettleSale("s", "A"), 2 + HOLD)] == [
        "SaleSettled"]  # fmt: skip
    assert terms_problem(SaleTerms("s", "A", 1, 1, 1, 0, 1, hold_ms=10)) is not None
    assert terms_problem(SaleTerms("s", "A", 1, 1, 1, 0, 1, hold_ms=1000, pay_grace_ms=-1))


def test_units_that_come_back_go_to_the_waitlist_in_order_and_the_rest_hear_at_once() -> None:
    ledger, events = SkuLedger("A"), []
    steps: list[tuple[int, Command]] = [
        (0, OpenSale(terms(1))),
        (100, PlaceIntent("i1", "u0", "s", "A", 1)),  # held
        (200, PlaceIntent("i2", "u1", "s", "A", 1)),  # waits, first in line
        (300, PlaceIntent("i3", "u2", "s", "A", 1)),  # waits, second
        (400, PlaceIntent("i4", "u3", "s", "A", 1)),  # the line is full: rejected
        (100 + HOLD, StartPayment("s", "A", "ord-i1", "u0", "a1")),  # too late: expires, i2 in
        (200 + HOLD, StartPayment("s", "A", "ord-i2", "u1", "a2")),
        (300 + HOLD, RecordPayment("s", "A", "ord-i2", "a2", True)),  # no hold left: i3 hears
    ]
    for at, cmd in steps:
        events += _apply(ledger, cmd, at)
    names = [type(e).__name__ for e in events]
    assert names == ["SaleOpened", "IntentAccepted", "Waitlisted", "Waitlisted",
                     "IntentRejected", "HoldExpired", "OrderRefused", "IntentAccepted",
                     "PaymentStarted", "OrderPaid", "IntentRejected"]  # fmt: skip
    served, last = events[7], events[-1]
    assert (served.intent_id, served.pay_by) == ("i2", 100 + HOLD + HOLD)  # type: ignore[union-attr]
    assert (last.intent_id, last.reason) == ("i3", "SOLD_OUT")  # type: ignore[union-attr]
    assert ledger.sales["s"].waitlist == [] and audited(events) == []


def test_a_too_big_head_does_not_block_the_line_and_the_line_ends_with_the_sale() -> None:
    from processors.core import ReturnUnits

    ledger, events = SkuLedger("A"), []
    wide = SaleTerms("s", "A", 2, 2, 2, 0, 50_000, hold_ms=HOLD, waitlist_depth=DEPTH)
    for at, cmd in [(0, OpenSale(wide)), (1, PlaceIntent("i1", "u0", "s", "A", 1)),
                    (2, PlaceIntent("i2", "u1", "s", "A", 1)),
                    (3, PlaceIntent("w1", "u2", "s", "A", 2)),  # waits for 2
                    (4, PlaceIntent("w2", "u3", "s", "A", 1)),  # waits for 1
                    (5, ReturnUnits("s", "A", 1, "r1")),  # nothing went out for good yet
                    (1 + HOLD, Tick("A"))]:  # fmt: skip
        events += _apply(ledger, cmd, at)
    names = [(type(e).__name__, getattr(e, "intent_id", "")) for e in events]
    # i1 expires: one unit, too few for w1 but enough for w2, served behind w1's back.
    assert names[-2:] == [("HoldExpired", ""), ("IntentAccepted", "w2")]
    returned = next(e for e in events if type(e).__name__ == "UnitsReturned")
    assert returned.quantity == 0  # type: ignore[union-attr]
    closed = _apply(ledger, CloseSale("s", "A"), 3 + HOLD)
    assert [(type(e).__name__, getattr(e, "reason", None)) for e in closed] == [
        ("SaleClosed", None), ("IntentRejected", "SALE_ENDED")]  # fmt: skip
    assert ledger.sales["s"].waitlist == [] and audited([*events, *closed]) == []


def test_the_audit_refuses_a_tick_that_expired_only_some_of_the_overdue_holds() -> None:
    from dataclasses import replace

    ledger, events = SkuLedger("A"), []
    for at, cmd in [(0, OpenSale(terms(3))), (100, PlaceIntent("i1", "u0", "s", "A", 1)),
                    (100, PlaceIntent("i2", "u1", "s", "A", 1)), (100 + HOLD, Tick("A")),
                    (200 + HOLD, PlaceIntent("i3", "u2", "s", "A", 1))]:  # fmt: skip
        events += _apply(ledger, cmd, at)
    assert [type(e).__name__ for e in events][-3:] == ["HoldExpired", "HoldExpired",
                                                       "IntentAccepted"]  # fmt: skip
    assert audited(events) == []
    # A writer that let one overdue hold live on: drop its expiry, renumber what follows.
    kept = events[:-2]
    last = events[-1]
    forged = [*kept, replace(last, sequence=last.sequence - 1, remaining=last.remaining - 1)]  # type: ignore[type-var]
    assert any(v.startswith("rules-mismatch") for v in audited(forged))
