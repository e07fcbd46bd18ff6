"""Property tests: the decision core against an independent reference model.

The same command streams then go through the writer in random batches; the state loaded
back from what it stored must equal the live ledger.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass, field
from unittest import mock

from hypothesis import event, given, settings
from hypothesis import strategies as st

from flashsale.sale_audit import command_for
from processors import writer as writer_mod
from processors.core import (
    CloseSale,
    Command,
    Event,
    IntentAccepted,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    RejectionReason,
    ReturnUnits,
    SaleSettled,
    SaleTerms,
    SettleSale,
    SkuLedger,
    UnitsReturned,
    decide,
    evolve,
    fold,
    intent_digest,
)
from processors.records import event_from_record
from processors.writer import PartitionWriter
from tests.unit.core_steps import step
from tests.unit.writer_fakes import (
    REGISTRY,
    MemoryStore,
    assert_same_state,
    loaded,
    log_of,
    persist,
)

SKU = "SKU-P"
USERS = ["ann", "bob", "cy", "dee"]
QUANTITIES = [-1, 0, 1, 1, 1, 2, 2, 3, 4]  # -1..4, weighted towards valid orders


@st.composite
def scenarios(draw: st.DrawFn, with_returns: bool = False) -> list[tuple[int, Command]]:
    """A timed command stream for one SKU: opens, intents, bursts, re-sends, closes, settles."""
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
    settling = False
    kinds = ["intent"] * 5 + ["burst", "rush", "resend", "resend", "forge", "open", "close"]
    kinds += ["settle"]
    kinds += ["return"] if with_returns else []
    for _ in range(draw(st.integers(1, 40))):
        now += draw(st.integers(0, 4))
        kind = draw(st.sampled_from(kinds))
        if kind == "open":
            stream.append((now, OpenSale(draw(st.sampled_from(terms)))))
        elif kind == "close":
            stream.append((now, CloseSale(draw(st.sampled_from(sale_ids)), SKU)))
        elif kind == "settle":
            stream.append((now, SettleSale(draw(st.sampled_from(sale_ids)), SKU)))
            settling = True
        elif kind == "return":
            sale = draw(st.sampled_from(sale_ids))
            ref = f"r{draw(st.integers(0, 5))}"
            stream.append((now, ReturnUnits(sale, SKU, draw(st.integers(-1, 3)), ref)))
        elif kind == "resend" and placed:
            stream.append((now, draw(st.sampled_from(placed))))
        elif kind == "forge" and placed:
            # Same intent id, other payload: still a repeat. Once a sale may be settled, a
            # forgery keeps its sale: a settled sale's ids are recognised only by intents of
            # that sale (its digests stay on disk), which is all a real intent id can be.
            old = draw(st.sampled_from(placed))
            sale = old.sale_id if settling else draw(st.sampled_from(targets))
            forged = PlaceIntent(
                old.intent_id, old.user_id, sale, SKU, draw(st.sampled_from(QUANTITIES))
            )
            stream.append((now, forged))
        elif kind == "rush":
            # Every user asks for 2 units of one sale at once: the last units run short.
            sale = draw(st.sampled_from(targets))
            for user in USERS:
                placed.append(PlaceIntent(f"i{len(placed)}", user, sale, SKU, 2))
                stream.append((now, placed[-1]))
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
    settled: bool = False
    per_user: Counter[str] = field(default_factory=Counter)


class ReferenceModel:
    """The rules written out plainly, sharing no code with the core."""

    def __init__(self) -> None:
        self.sales: dict[str, RefSale] = {}
        self.outcomes: dict[str, tuple[str, int]] = {}
        self.returns: set[tuple[str, str]] = set()

    def open(self, t: SaleTerms) -> None:
        valid = t.allocation >= 0 and t.per_user_limit >= 1 and t.per_order_max >= 1
        if valid and t.starts_at_ms < t.ends_at_ms and t.sale_id not in self.sales:
            self.sales[t.sale_id] = RefSale(t, t.allocation)

    def close(self, sale_id: str) -> None:
        if sale_id in self.sales:
            self.sales[sale_id].closed = True

    def settle(self, sale_id: str, now: int) -> bool:
        """Whether this settles the sale now (it must exist, be over and not settled yet)."""
        s = self.sales.get(sale_id)
        if s is None or s.settled or not (s.closed or now >= s.terms.ends_at_ms):
            return False
        s.closed = s.settled = True
        return True

    def is_repeat(self, cmd: Command) -> bool:
        """Whether ``cmd`` was already decided (and so must yield nothing)."""
        if isinstance(cmd, PlaceIntent):
            return cmd.intent_id in self.outcomes
        return isinstance(cmd, ReturnUnits) and (cmd.sale_id, cmd.ref) in self.returns

    def give_back(self, sale_id: str, ref: str, qty: int) -> int | None:
        sale = self.sales.get(sale_id)
        if sale is None or sale.settled or qty <= 0 or (sale_id, ref) in self.returns:
            return None
        applied = min(qty, sale.terms.allocation - sale.left)
        sale.left += applied
        self.returns.add((sale_id, ref))
        return applied

    def place(self, c: PlaceIntent, now: int) -> tuple[str, int]:
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


Decided = IntentAccepted | IntentRejected


def run_and_check(stream: list[tuple[int, Command]], seen: Counter[str]) -> SkuLedger:
    """Decide ``stream`` on a fresh ledger, checking every event; return the ledger."""
    ledger, model = SkuLedger(SKU), ReferenceModel()
    decisions: list[Decided] = []
    emitted: list[Event] = []
    for now, cmd in stream:
        before = copy.deepcopy(ledger) if model.is_repeat(cmd) else None
        events = step(ledger, cmd, now)
        emitted += events
        if before is not None:
            # A repeat (client or producer retry, forged payload): nothing out, nothing changed.
            assert events == [] and ledger == before, cmd
            seen["repeat"] += 1
        elif isinstance(cmd, PlaceIntent):
            [decision] = events
            assert isinstance(decision, IntentAccepted | IntentRejected)
            outcome, remaining = model.place(cmd, now)
            decisions.append(decision)
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
            seen["return"] += len(events)
        elif isinstance(cmd, SettleSale):
            settles = model.settle(cmd.sale_id, now)
            done = [e for e in events if isinstance(e, SaleSettled)]
            assert len(done) == settles, (cmd, events)
            if done:
                # Everything decided in the sale's book is forgotten, kept only as digests.
                in_book = {
                    d.intent_id
                    for d in decisions
                    if d.sale_id == cmd.sale_id
                    and not (
                        isinstance(d, IntentRejected) and d.reason is RejectionReason.UNKNOWN_SALE
                    )
                }
                assert done[0].intents == len(in_book)
                book = ledger.sales[cmd.sale_id]
                assert book.settled_digests == frozenset(map(intent_digest, in_book))
                seen["settled"] += 1
        elif isinstance(cmd, OpenSale):
            model.open(cmd.terms)
        else:
            model.close(cmd.sale_id)

    # Sequence numbers: gap-free 1..N per (sale, SKU), in emission order; the ledger (its book,
    # or for a sale never opened its orphan count) knows N.
    by_sale: dict[str, list[int]] = {}
    for d in emitted:
        by_sale.setdefault(d.sale_id, []).append(d.sequence)
    for sale_id, numbers in by_sale.items():
        assert numbers == list(range(1, len(numbers) + 1)), (sale_id, numbers)
        book = ledger.sales.get(sale_id)
        known = book.sequence if book is not None else ledger.orphan_sequences[sale_id]
        assert known == len(numbers), sale_id
        if any(n >= 2 for n in numbers) and len(by_sale) > 1:
            seen["sequence-per-sale"] += 1
    # The state is a function of the log: evolve folded over every emitted event, from
    # nothing, gives the ledger the writer holds (decide never changed it: see ``step``).
    assert fold(SkuLedger(SKU), emitted) == ledger
    # The audit's check: each event is what decide yields for the command rebuilt from it,
    # on the state its predecessors fold to (a zero-unit return included).
    audited = SkuLedger(SKU)
    for e in emitted:
        command = command_for(e)
        if command is not None:
            assert decide(audited, command, e.decided_at) == [e], e
        evolve(audited, e)
    # Invariants computed from the emitted events alone.
    for sale_id, book in ledger.sales.items():
        accepted = [d for d in decisions if isinstance(d, IntentAccepted) and d.sale_id == sale_id]
        back = sum(
            e.quantity for e in emitted if isinstance(e, UnitsReturned) and e.sale_id == sale_id
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
    ids = Counter(d.intent_id for d in decisions)
    assert set(ids) == {c.intent_id for _, c in stream if isinstance(c, PlaceIntent)}
    assert set(ids.values()) <= {1}
    for label in ("repeat", "USER_LIMIT", "SOLD_OUT", "settled"):
        if seen[label]:
            event(f"has {label}")
    return ledger


def check_persisted(
    stream: list[tuple[int, Command]], live: SkuLedger, cuts: set[int], every: int
) -> None:
    """The writer, fed ``stream`` in batches cut at ``cuts``, decides as the core did, and
    the state loaded back from its store equals the core's ledger."""
    log = log_of(stream)
    edges = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    core = SkuLedger(SKU)
    expected = [e for at, cmd in stream for e in step(core, cmd, at)]
    with mock.patch.object(writer_mod, "CHECKPOINT_EVERY", every):
        writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
        got: list[Event] = []
        for first, end in itertools.pairwise(edges):
            result = persist(writer, store, log.between(first, end), committed=first)
            got += [event_from_record(*REGISTRY.decode(value)) for _, value in result.events]
    assert got == expected
    assert_same_state(writer.ledgers, {SKU: live})
    assert_same_state(loaded(store, len(stream)).ledgers, {SKU: live})


def check_many(with_returns: bool, examples: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    per_example: Counter[str] = Counter()

    @settings(max_examples=examples, deadline=None)
    @given(
        scenarios(with_returns=with_returns),
        st.sets(st.integers(1, 120), max_size=12),
        st.sampled_from([0, 1, 3, 2_000]),
    )
    def check(stream: list[tuple[int, Command]], cuts: set[int], every: int) -> None:
        local: Counter[str] = Counter()
        ledger = run_and_check(stream, local)
        check_persisted(stream, ledger, cuts, every)
        seen.update(local)
        per_example.update(set(local))

    check()
    return per_example


def test_decisions_match_reference_model_and_hold_invariants() -> None:
    per_example = check_many(with_returns=False, examples=400)
    # Guard against a vacuous pass: the stressors must actually have been exercised. At least
    # once, not 5 times: INSUFFICIENT_STOCK came up in 5 to 35 of 400 examples over three runs,
    # so a guard of 5 failed now and then with nothing wrong (an unexplained CI failure).
    for label in (
        "repeat",
        "ACCEPTED",
        "USER_LIMIT",
        "SOLD_OUT",
        "INSUFFICIENT_STOCK",
        "UNKNOWN_SALE",
        "SALE_ENDED",
        "INVALID_QUANTITY",
        "user-at-limit",
        "sold-out-sale",
        "settled",
        "sequence-per-sale",
    ):
        assert per_example[label] >= 1, (label, per_example)


def test_returned_units_keep_accounting_coherent() -> None:
    per_example = check_many(with_returns=True, examples=200)
    assert per_example["return"] >= 5, per_example
