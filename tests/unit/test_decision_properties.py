"""Property tests: the decision core against an independent reference model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import event, given, settings
from hypothesis import strategies as st

from processors.decision import (
    CloseSale,
    Command,
    IntentAccepted,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    ReturnUnits,
    SaleTerms,
    SkuLedger,
    UnitsReturned,
    decide,
    ledger_from_decisions,
)

SKU = "SKU-P"
USERS = ["ann", "bob", "cy", "dee"]
QUANTITIES = [-1, 0, 1, 1, 1, 2, 2, 3, 4]  # -1..4, weighted towards valid orders


@st.composite
def scenarios(draw: st.DrawFn, with_returns: bool = False) -> list[tuple[int, Command]]:
    """A timed command stream for one SKU: opens, intents, bursts, re-sends, closes."""
    terms = [
        SaleTerms(
            f"s{k}",
            SKU,
            draw(st.integers(0, 6)),
            draw(st.integers(1, 3)),
            draw(st.integers(1, 3)),
            start,
            start + draw(st.integers(-1, 80)),
        )
        for k, start in enumerate(draw(st.lists(st.integers(0, 10), min_size=1, max_size=3)))
    ]
    sale_ids = [t.sale_id for t in terms] + ["s-none"]
    # Mostly real, open sales: rejections for unknown sales are cheap to get, acceptances not.
    targets = [t.sale_id for t in terms] * 3 + ["s-none"]
    now = 0
    stream: list[tuple[int, Command]] = [
        (0, OpenSale(t)) for t in terms if draw(st.integers(0, 4)) > 0
    ]
    placed: list[PlaceIntent] = []
    kinds = ["intent"] * 5 + ["burst", "resend", "resend", "forge", "open", "close"]
    kinds += ["return"] if with_returns else []
    for _ in range(draw(st.integers(1, 40))):
        now += draw(st.integers(0, 4))
        kind = draw(st.sampled_from(kinds))
        if kind == "open":
            stream.append((now, OpenSale(draw(st.sampled_from(terms)))))
        elif kind == "close":
            stream.append((now, CloseSale(draw(st.sampled_from(sale_ids)), SKU)))
        elif kind == "return":
            sale = draw(st.sampled_from(sale_ids))
            ref = f"r{draw(st.integers(0, 5))}"
            stream.append((now, ReturnUnits(sale, SKU, draw(st.integers(-1, 3)), ref)))
        elif kind == "resend" and placed:
            stream.append((now, draw(st.sampled_from(placed))))
        elif kind == "forge" and placed:
            # Same intent id, other payload: still the first decision.
            old = draw(st.sampled_from(placed))
            forged = PlaceIntent(
                old.intent_id,
                old.user_id,
                draw(st.sampled_from(targets)),
                SKU,
                draw(st.sampled_from(QUANTITIES)),
            )
            stream.append((now, forged))
        else:
            user = draw(st.sampled_from(USERS))
            sale = draw(st.sampled_from(targets))
            for _ in range(draw(st.integers(2, 6)) if kind == "burst" else 1):
                intent = PlaceIntent(
                    f"i{len(placed)}", user, sale, SKU, draw(st.sampled_from(QUANTITIES))
                )
                placed.append(intent)
                stream.append((now, intent))
    return stream


@dataclass
class RefSale:
    terms: SaleTerms
    left: int
    closed: bool = False
    per_user: Counter[str] = field(default_factory=Counter)


class ReferenceModel:
    """The rules written out plainly, sharing no code with the core."""

    def __init__(self) -> None:
        self.sales: dict[str, RefSale] = {}
        self.outcomes: dict[str, tuple[str, int]] = {}
        self.returns: dict[tuple[str, str], int] = {}

    def open(self, t: SaleTerms) -> None:
        valid = t.allocation >= 0 and t.per_user_limit >= 1 and t.per_order_max >= 1
        if valid and t.starts_at_ms < t.ends_at_ms and t.sale_id not in self.sales:
            self.sales[t.sale_id] = RefSale(t, t.allocation)

    def close(self, sale_id: str) -> None:
        if sale_id in self.sales:
            self.sales[sale_id].closed = True

    def give_back(self, sale_id: str, ref: str, qty: int) -> int | None:
        sale = self.sales.get(sale_id)
        if sale is None or qty <= 0:
            return None
        if (sale_id, ref) not in self.returns:
            applied = min(qty, sale.terms.allocation - sale.left)
            sale.left += applied
            self.returns[sale_id, ref] = applied
        return self.returns[sale_id, ref]

    def place(self, c: PlaceIntent, now: int) -> tuple[str, int]:
        if c.intent_id not in self.outcomes:
            self.outcomes[c.intent_id] = self._judge(c, now)
        return self.outcomes[c.intent_id]

    def _judge(self, c: PlaceIntent, now: int) -> tuple[str, int]:
        s = self.sales.get(c.sale_id)
        if s is None:
            return "UNKNOWN_SALE", 0
        t, q = s.terms, c.quantity
        if q < 1:
            return "INVALID_QUANTITY", s.left
        if q > t.per_order_max:
            return "ORDER_MAX_EXCEEDED", s.left
        if now < t.starts_at_ms:
            return "SALE_NOT_OPEN", s.left
        if s.closed or now >= t.ends_at_ms:
            return "SALE_ENDED", s.left
        if s.left == 0:
            return "SOLD_OUT", s.left
        if s.per_user[c.user_id] + q > t.per_user_limit:
            return "USER_LIMIT", s.left
        if q > s.left:
            return "INSUFFICIENT_STOCK", s.left
        s.left -= q
        s.per_user[c.user_id] += q
        return "ACCEPTED", s.left


def run_and_check(stream: list[tuple[int, Command]], seen: Counter[str]) -> None:
    ledger, model = SkuLedger(SKU), ReferenceModel()
    first: dict[str, IntentAccepted | IntentRejected] = {}
    distinct: list[IntentAccepted | IntentRejected | UnitsReturned] = []
    returned: dict[tuple[str, str], UnitsReturned] = {}
    closed: set[str] = set()
    for now, cmd in stream:
        events = decide(ledger, cmd, now)
        if isinstance(cmd, PlaceIntent):
            [decision] = events
            assert isinstance(decision, IntentAccepted | IntentRejected)
            outcome, remaining = model.place(cmd, now)
            if cmd.intent_id in first:
                assert decision is first[cmd.intent_id]
                seen["duplicate"] += 1
                continue
            first[cmd.intent_id] = decision
            distinct.append(decision)
            got = "ACCEPTED" if isinstance(decision, IntentAccepted) else decision.reason.value
            assert (got, decision.remaining) == (outcome, remaining), cmd
            assert (decision.intent_id, decision.quantity, decision.decided_at) == (
                cmd.intent_id,
                cmd.quantity,
                now,
            )
            seen[got] += 1
        elif isinstance(cmd, ReturnUnits):
            applied = model.give_back(cmd.sale_id, cmd.ref, cmd.quantity)
            assert [e.quantity for e in events if isinstance(e, UnitsReturned)] == (
                [] if applied is None else [applied]
            )
            for e in events:
                assert isinstance(e, UnitsReturned)
                if (cmd.sale_id, cmd.ref) not in returned:
                    returned[cmd.sale_id, cmd.ref] = e
                    distinct.append(e)
                    seen["return"] += 1
                assert e is returned[cmd.sale_id, cmd.ref]
        elif isinstance(cmd, OpenSale):
            model.open(cmd.terms)
        else:
            model.close(cmd.sale_id)
            if cmd.sale_id in ledger.sales:
                closed.add(cmd.sale_id)

    # Sequence numbers of distinct decisions: gap-free 1..N, in emission order.
    assert [d.sequence for d in distinct] == list(range(1, len(distinct) + 1))
    assert ledger.sequence == len(distinct)
    # Invariants computed from the emitted events alone.
    for sale_id, book in ledger.sales.items():
        accepted = [d for d in distinct if isinstance(d, IntentAccepted) and d.sale_id == sale_id]
        back = sum(
            e.quantity for e in distinct if isinstance(e, UnitsReturned) and e.sale_id == sale_id
        )
        taken = sum(d.quantity for d in accepted)
        assert taken - back <= book.terms.allocation  # never oversell
        if back == 0:
            assert taken <= book.terms.allocation
        per_user = Counter[str]()
        for d in accepted:
            per_user[d.user_id] += d.quantity
        assert all(n <= book.terms.per_user_limit for n in per_user.values())
        assert book.remaining == book.terms.allocation - taken + back
        if any(n == book.terms.per_user_limit for n in per_user.values()):
            seen["user-at-limit"] += 1
        if book.remaining == 0 and accepted:
            seen["sold-out-sale"] += 1
    # Every intent got exactly one decision.
    assert set(first) == {c.intent_id for _, c in stream if isinstance(c, PlaceIntent)}
    # Rebuilding from the persisted terms + decisions gives the same ledger.
    terms = [b.terms for b in ledger.sales.values()]
    assert ledger_from_decisions(SKU, terms, closed, reversed(distinct)) == ledger
    for label in ("duplicate", "USER_LIMIT", "SOLD_OUT"):
        if seen[label]:
            event(f"has {label}")


def check_many(with_returns: bool, examples: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    per_example: Counter[str] = Counter()

    @settings(max_examples=examples, deadline=None)
    @given(scenarios(with_returns=with_returns))
    def check(stream: list[tuple[int, Command]]) -> None:
        local: Counter[str] = Counter()
        run_and_check(stream, local)
        seen.update(local)
        per_example.update(set(local))

    check()
    return per_example


def test_decisions_match_reference_model_and_hold_invariants() -> None:
    per_example = check_many(with_returns=False, examples=400)
    # Guard against a vacuous pass: the stressors must actually have been exercised.
    for label in (
        "duplicate",
        "ACCEPTED",
        "USER_LIMIT",
        "SOLD_OUT",
        "INSUFFICIENT_STOCK",
        "UNKNOWN_SALE",
        "SALE_ENDED",
        "INVALID_QUANTITY",
        "user-at-limit",
        "sold-out-sale",
    ):
        assert per_example[label] >= 5, (label, per_example)


def test_returned_units_keep_accounting_coherent() -> None:
    per_example = check_many(with_returns=True, examples=200)
    assert per_example["return"] >= 5, per_example
