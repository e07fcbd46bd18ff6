"""The pre-queue and its commit-reveal draw, on the pure core (``processors.core.prequeue``).

Every test folds ``decide`` + ``evolve`` over a log of (log time, command), as the writer does;
invariants are computed from the events themselves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.core import (
    CloseSale,
    Command,
    DrawRevealed,
    EntryQueued,
    Event,
    IntentAccepted,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    QueueExpired,
    QueueKind,
    RejectionReason,
    RevealDraw,
    SaleRefused,
    SaleSettled,
    SaleTerms,
    SettleSale,
    SkuLedger,
    Tick,
    decide,
    evolve,
    terms_problem,
)
from processors.core.prequeue import commitment, draw_order, entries_digest

SEED = "5eed" * 16
OTHER_SEED = "0123456789abcdef" * 4
OPENS, STARTS, ENDS = 100, 200, 1_000


def terms(allocation: int = 3, limit: int = 1, seed: str = SEED) -> SaleTerms:
    return SaleTerms("s", "A", allocation, limit, 2, STARTS, ENDS, 1, OPENS, commitment(seed))


def run(log: list[tuple[int, Command]], ledger: SkuLedger | None = None) -> list[Event]:
    ledger = ledger or SkuLedger("A")
    events: list[Event] = []
    for at, command in log:
        for event in decide(ledger, command, at):
            evolve(ledger, event)
            events.append(event)
    return events


def intent(n: int, user: str, quantity: int = 1) -> PlaceIntent:
    return PlaceIntent(f"i{n}", user, "s", "A", quantity)


def decisions(events: list[Event]) -> list[IntentAccepted | IntentRejected]:
    return [e for e in events if isinstance(e, IntentAccepted | IntentRejected)]


def check_invariants(events: list[Event], intents: list[PlaceIntent], allocation: int) -> None:
    """Gap-free sequences, one decision per intent id, nothing oversold."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    decided = Counter(d.intent_id for d in decisions(events))
    assert all(n == 1 for n in decided.values())
    assert set(decided) <= {i.intent_id for i in intents}
    assert sum(d.quantity for d in decisions(events) if isinstance(d, IntentAccepted)) <= allocation


def test_terms_need_both_window_and_commitment_and_a_window_before_the_start() -> None:
    assert terms_problem(terms()) is None
    base = terms()
    assert "both" in str(terms_problem(SaleTerms("s", "A", 1, 1, 1, STARTS, ENDS, 1, OPENS)))
    late = SaleTerms("s", "A", 1, 1, 1, STARTS, ENDS, 1, STARTS, base.draw_commitment)
    assert "before starts_at" in str(terms_problem(late))
    bad = SaleTerms("s", "A", 1, 1, 1, STARTS, ENDS, 1, OPENS, "XYZ")
    assert "64 lowercase hex" in str(terms_problem(bad))


def test_intents_are_queued_in_the_window_and_decided_in_draw_order_at_the_reveal() -> None:
    users = [f"u{n}" for n in range(12)]
    placed = [intent(n, u) for n, u in enumerate(users)]
    log: list[tuple[int, Command]] = [(0, OpenSale(terms()))]
    log += [(OPENS - 1, intent(99, "early"))]
    log += [(OPENS + n, p) for n, p in enumerate(placed)]
    log += [(STARTS, RevealDraw("s", "A", SEED))]
    events = run(log)
    early = events[1]
    assert isinstance(early, IntentRejected) and early.reason is RejectionReason.SALE_NOT_OPEN
    queued = [e for e in events if isinstance(e, EntryQueued)]
    assert [q.kind for q in queued] == [QueueKind.ENTRY] * 12
    assert [q.entrants for q in queued] == list(range(1, 13))
    drawn = next(e for e in events if isinstance(e, DrawRevealed))
    assert (drawn.seed, drawn.entrants) == (SEED, 12)
    entries = [(p.user_id, p.intent_id, p.quantity) for p in placed]
    assert drawn.entries_digest == entries_digest(entries)
    _, order = draw_order(SEED, entries)
    after = decisions(events)[1:]  # the early rejection first
    assert [d.user_id for d in after] == [user for user, _, _ in order]
    assert [(d.draw_rank, d.draw_size) for d in after] == [(k, 12) for k in range(1, 13)]
    assert [type(d) for d in after] == [IntentAccepted] * 3 + [IntentRejected] * 9
    assert {d.reason for d in after if isinstance(d, IntentRejected)} == {RejectionReason.SOLD_OUT}
    check_invariants(events, [*placed, intent(99, "early")], 3)


def test_one_chance_per_person_repeats_get_one_rejection_each_at_the_draw() -> None:
    log: list[tuple[int, Command]] = [(0, OpenSale(terms(allocation=10, limit=2)))]
    log += [(OPENS, intent(1, "bot")), (OPENS, intent(2, "bot")), (OPENS, intent(3, "bot")),
            (OPENS, intent(4, "ann")), (OPENS, intent(2, "bot"))]  # fmt: skip
    events = run(log)
    queued = [e for e in events if isinstance(e, EntryQueued)]
    assert [q.kind for q in queued] == [
        QueueKind.ENTRY,
        QueueKind.REPEAT,
        QueueKind.REPEAT,
        QueueKind.ENTRY,
    ]  # fmt: skip  (the resent i2: nothing)
    events += run([(STARTS + 5, RevealDraw("s", "A", SEED))], _ledger_after(log))
    final = decisions(events)
    by_id = {d.intent_id: d for d in final}
    assert set(by_id) == {"i1", "i2", "i3", "i4"} and len(final) == 4
    for repeat in ("i2", "i3"):
        rejected = by_id[repeat]
        assert isinstance(rejected, IntentRejected)
        assert rejected.reason is RejectionReason.ALREADY_QUEUED and rejected.draw_rank == 0
    assert all(isinstance(by_id[i], IntentAccepted) for i in ("i1", "i4"))


def _ledger_after(log: list[tuple[int, Command]]) -> SkuLedger:
    ledger = SkuLedger("A")
    run(log, ledger)
    return ledger


def test_a_reveal_before_the_start_or_with_another_seed_is_refused_and_decides_nothing() -> None:
    log: list[tuple[int, Command]] = [(0, OpenSale(terms())), (OPENS, intent(1, "ann"))]
    ledger = _ledger_after(log)
    for at, seed, why in ((STARTS - 1, SEED, "before the start"),
                          (STARTS, OTHER_SEED, "does not match"),
                          (STARTS, "not hex", "hex characters")):  # fmt: skip
        (refused,) = run([(at, RevealDraw("s", "A", seed))], ledger)
        assert isinstance(refused, SaleRefused) and why in refused.detail
    assert ledger.sales["s"].queue and not ledger.sales["s"].queue_done
    late = run([(STARTS + 1, intent(2, "bob"))], ledger)
    assert [type(e) for e in late] == [EntryQueued]  # after the start: queued behind the draw
    assert late[0].kind is QueueKind.LATE  # type: ignore[union-attr]
    events = run([(STARTS + 2, RevealDraw("s", "A", SEED))], ledger)
    assert [type(e) for e in events] == [DrawRevealed, IntentAccepted, IntentAccepted]
    assert [d.intent_id for d in decisions(events)] == ["i1", "i2"]  # drawn, then late arrivals
    assert run([(STARTS + 3, RevealDraw("s", "A", SEED))], ledger) == []  # one draw per sale


def test_no_reveal_by_the_end_rejects_every_queued_intent_draw_not_revealed() -> None:
    log: list[tuple[int, Command]] = [(0, OpenSale(terms())), (OPENS, intent(1, "ann")),
                                      (OPENS, intent(2, "ann")),
                                      (STARTS, intent(3, "bob"))]  # fmt: skip
    ledger = _ledger_after(log)
    assert run([(ENDS - 1, Tick("A"))], ledger) == []
    events = run([(ENDS, Tick("A"))], ledger)
    assert isinstance(events[0], QueueExpired) and events[0].queued == 3
    assert [(d.intent_id, d.reason) for d in decisions(events)] == [  # type: ignore[union-attr]
        (f"i{n}", RejectionReason.DRAW_NOT_REVEALED) for n in (1, 2, 3)
    ]
    assert run([(ENDS + 1, RevealDraw("s", "A", SEED))], ledger) == []
    (after,) = run([(ENDS + 1, intent(4, "cy"))], ledger)
    assert isinstance(after, IntentRejected) and after.reason is RejectionReason.SALE_ENDED


def test_the_end_is_seen_by_any_command_and_by_close_and_settle() -> None:
    log: list[tuple[int, Command]] = [(0, OpenSale(terms())), (OPENS, intent(1, "ann"))]
    ended = run([(ENDS, intent(2, "bob"))], _ledger_after(log))
    assert [type(e) for e in ended] == [QueueExpired, IntentRejected, IntentRejected]
    closed = run([(STARTS, CloseSale("s", "A"))], _ledger_after(log))
    assert [type(e).__name__ for e in closed] == ["SaleClosed", "QueueExpired", "IntentRejected"]
    settled = run([(ENDS, SettleSale("s", "A"))], _ledger_after(log))
    assert [type(e) for e in settled] == [QueueExpired, IntentRejected, SaleSettled]
    assert settled[-1].intents == 1  # type: ignore[union-attr]


# -- properties -------------------------------------------------------------------------

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
ENTRIES = st.lists(
    st.tuples(st.text("abcdefgh", min_size=1, max_size=6), st.integers(1, 3)),
    min_size=10,
    max_size=40,
    unique_by=lambda e: e[0],
).map(lambda es: [(user, f"i-{user}", q) for user, q in es])


@settings(max_examples=60, deadline=None)
@given(seed=HEX, entries=ENTRIES, shuffle=st.randoms(use_true_random=False))
def test_the_order_is_a_function_of_the_seed_and_the_entry_set(
    seed: str, entries: list[tuple[str, str, int]], shuffle: object
) -> None:
    digest, order = draw_order(seed, entries)
    listed = list(entries)
    shuffle.shuffle(listed)  # type: ignore[attr-defined]
    assert draw_order(seed, listed) == (digest, order)  # arrival order does not matter
    assert sorted(order) == sorted(entries)
    assert draw_order(seed[::-1] if seed[::-1] != seed else "f" * 64, entries)[1] != order
    changed = [*entries[:-1], (entries[-1][0], entries[-1][1], entries[-1][2] + 1)]
    other_digest, other_order = draw_order(seed, changed)
    assert other_digest != digest
    assert [u for u, _, _ in other_order] != [u for u, _, _ in order]


@settings(max_examples=80, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.integers(OPENS - 20, ENDS + 20), st.sampled_from("abcdef"),
                  st.integers(-1, 3)),
        max_size=40,
    ),
    reveal_at=st.one_of(st.none(), st.integers(OPENS, ENDS + 20)),
    wrong_first=st.booleans(),
    allocation=st.integers(0, 6),
)  # fmt: skip
def test_every_intent_gets_exactly_one_decision_and_nothing_is_decided_before_the_draw(
    arrivals: list[tuple[int, str, int]],
    reveal_at: int | None,
    wrong_first: bool,
    allocation: int,
) -> None:
    timed: list[tuple[int, Command]] = []
    placed = []
    for n, (at, user, q) in enumerate(sorted(arrivals)):
        cmd = intent(n, user, q)
        placed.append(cmd)
        timed.append((at, cmd))
    if reveal_at is not None:
        if wrong_first:
            timed.append((reveal_at, RevealDraw("s", "A", OTHER_SEED)))
        timed.append((reveal_at, RevealDraw("s", "A", SEED)))
    timed.append((ENDS + 30, Tick("A")))
    log = [(0, OpenSale(terms(allocation, limit=2))), *sorted(timed, key=lambda t: t[0])]
    events = run(log)
    check_invariants(events, placed, allocation)
    decided = {d.intent_id for d in decisions(events)}
    assert decided == {p.intent_id for p in placed}  # all decided once the sale is over
    drawn = [e for e in events if isinstance(e, DrawRevealed)]
    assert len(drawn) <= 1
    first_drawn = events.index(drawn[0]) if drawn else len(events)
    for event in events[:first_drawn]:  # before the draw only order-free outcomes are decided
        if isinstance(event, IntentAccepted):
            raise AssertionError(f"accepted before the draw: {event}")
        if isinstance(event, IntentRejected):
            assert event.reason in (RejectionReason.SALE_NOT_OPEN, RejectionReason.SALE_ENDED,
                                    RejectionReason.INVALID_QUANTITY,
                                    RejectionReason.ORDER_MAX_EXCEEDED,
                                    RejectionReason.DRAW_NOT_REVEALED)  # fmt: skip
    per_user = Counter(e.user_id for e in events if isinstance(e, EntryQueued)
                       and e.kind is QueueKind.ENTRY)  # fmt: skip
    assert all(n == 1 for n in per_user.values())  # one chance per person


# -- the audit recomputes the draw from the log ------------------------------------------


def _audited(events: list[Event]) -> list[str]:
    """Kinds of violation the sale audit finds in ``events`` (as records, in log order)."""
    from flashsale.sale_audit import SaleAudit, _check_events
    from processors.records import record_name, to_record

    items = [(record_name(e), to_record(e)) for e in events]
    terms = {r["sku"]: r for n, r in items if n == "SaleOpened"}
    out = SaleAudit("s")
    _check_events(out, terms, items)
    return sorted({v.kind for v in out.violations})


def _drawn_sale() -> list[Event]:
    log: list[tuple[int, Command]] = [(0, OpenSale(terms(allocation=4)))]
    log += [(OPENS + n, intent(n, f"u{n}")) for n in range(10)]
    log += [(OPENS + 50, intent(10, "u3")), (STARTS + 1, intent(11, "late"))]
    return run([*log, (STARTS + 2, RevealDraw("s", "A", SEED))])


def test_the_audit_passes_a_drawn_sale_and_an_expired_one() -> None:
    assert _audited(_drawn_sale()) == []
    log: list[tuple[int, Command]] = [(0, OpenSale(terms())), (OPENS, intent(1, "ann"))]
    assert _audited(run([*log, (ENDS, intent(2, "bob")), (ENDS + 1, Tick("A"))])) == []
    assert _audited(run([*log, (STARTS, CloseSale("s", "A"))])) == []


def test_the_audit_fails_a_draw_that_did_not_follow_the_seed() -> None:
    events = _drawn_sale()
    first = next(i for i, e in enumerate(events) if isinstance(e, DrawRevealed)) + 1
    a, b = events[first], events[first + 1]
    assert isinstance(a, IntentAccepted) and isinstance(b, IntentAccepted)
    swapped = list(events)  # the first two winners trade places in the order
    swapped[first] = replace(b, sequence=a.sequence, draw_rank=a.draw_rank)
    swapped[first + 1] = replace(a, sequence=b.sequence, draw_rank=b.draw_rank)
    assert "rules-mismatch" in _audited(swapped)


def test_the_audit_fails_another_seed_and_a_dropped_entry() -> None:
    events = _drawn_sale()
    at = next(i for i, e in enumerate(events) if isinstance(e, DrawRevealed))
    reseeded = list(events)
    reseeded[at] = replace(events[at], seed=OTHER_SEED)  # type: ignore[type-var]
    assert "rules-mismatch" in _audited(reseeded)
    # Drop one entry and renumber: the digest and the draw no longer match the log.
    queued = next(i for i, e in enumerate(events) if isinstance(e, EntryQueued))
    dropped_id = events[queued].intent_id  # type: ignore[union-attr]
    kept = [e for i, e in enumerate(events) if i != queued
            and getattr(e, "intent_id", None) != dropped_id]  # fmt: skip
    renumbered = [replace(e, sequence=n) for n, e in enumerate(kept, 1)]  # type: ignore[type-var]
    assert "rules-mismatch" in _audited(renumbered)


def test_the_writer_hands_a_tick_to_every_ledger_and_a_reload_keeps_the_queue() -> None:
    from processors.writer import PartitionWriter
    from tests.unit.writer_fakes import REGISTRY, InputLog, MemoryStore, loaded, persist

    b_terms = SaleTerms("s", "B", 3, 1, 2, STARTS, ENDS, 1, OPENS, commitment(SEED))
    log = InputLog()
    log.add(OpenSale(terms()), 0)
    log.add(OpenSale(b_terms), 0)
    log.add(intent(1, "ann"), OPENS)
    log.add(PlaceIntent("i2", "bob", "s", "B", 1), OPENS)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    persist(writer, store, log.between(0, 4))
    again = loaded(store, 4)  # a crash after the batch committed: the queues come back
    assert again.ledgers["A"].sales["s"].queue == [("i1", "ann", 1, "ENTRY")]
    assert again.ledgers["B"].sales["s"].queued_ids == {"i2"}
    log.add(Tick(""), ENDS)
    result = persist(again, store, log.between(4, 5))
    names = [REGISTRY.decode(value)[0] for _, value in result.events]
    assert names == ["QueueExpired", "IntentRejected"] * 2
    assert {key for key, _ in result.events} == {b"A", b"B"}
    final = loaded(store, 5)
    assert all(led.sales["s"].queue_done for led in final.ledgers.values())
    assert final.ledgers["A"].sales["s"].decided == {"i1"}


# -- flashsale audit fairness: the draw recomputed from the facts ------------------------


def _fairness(events: list[Event]) -> list[str]:
    from flashsale.fairness import check_draw
    from processors.records import record_name, to_record

    return check_draw("A", [(record_name(e), to_record(e)) for e in events])[1]


def test_the_fairness_check_passes_a_drawn_and_an_expired_sale() -> None:
    from flashsale.fairness import check_draw
    from processors.records import record_name, to_record

    events = _drawn_sale()
    figures, problems = check_draw("A", [(record_name(e), to_record(e)) for e in events])
    assert problems == []
    assert (figures.outcome, figures.entrants, figures.repeats, figures.late) == ("drawn", 10, 1, 1)
    assert figures.seed == SEED and figures.winners == 4
    log: list[tuple[int, Command]] = [(0, OpenSale(terms())), (OPENS, intent(1, "ann"))]
    assert _fairness(run([*log, (ENDS, Tick("A"))])) == []


def test_the_fairness_check_names_each_kind_of_tampering() -> None:
    events = _drawn_sale()
    at = next(i for i, e in enumerate(events) if isinstance(e, DrawRevealed))
    reseeded = list(events)
    reseeded[at] = replace(events[at], seed=OTHER_SEED)  # type: ignore[type-var]
    assert any("does not hash to the commitment" in p for p in _fairness(reseeded))
    a, b = events[at + 1], events[at + 2]
    swapped = list(events)
    swapped[at + 1] = replace(b, sequence=a.sequence, draw_rank=a.draw_rank)  # type: ignore[type-var]
    swapped[at + 2] = replace(a, sequence=b.sequence, draw_rank=b.draw_rank)  # type: ignore[type-var]
    assert any("do not follow the draw" in p for p in _fairness(swapped))
    queued = next(i for i, e in enumerate(events) if isinstance(e, EntryQueued))
    dropped = [e for i, e in enumerate(events) if i != queued]
    assert any("another entry set" in p for p in _fairness(dropped))
    early = list(events)  # a winner decided before the draw
    early.insert(at, early.pop(at + 1))
    assert any("decided before the draw" in p for p in _fairness(early))


def test_the_input_audit_waits_for_a_queued_intent_only_until_its_queue_is_resolved() -> None:
    from flashsale.input_audit import account_records
    from processors.records import record_name, to_record

    log: list[tuple[int, Command]] = [(0, OpenSale(terms())), (OPENS, intent(1, "ann")),
                                      (OPENS, intent(2, "bob"))]  # fmt: skip
    commands = [(0, n, "PurchaseIntent", {"intent_id": f"i{n}", "sale_id": "s"})
                for n in (1, 2)]  # fmt: skip
    queued = run(log)
    decided = [(0, k, record_name(e), to_record(e)) for k, e in enumerate(queued)]
    waiting = account_records(commands, decided, set(), "s")
    assert waiting.holds and (waiting.queued, waiting.decided) == (2, 0)
    drawn = run([*log, (STARTS, RevealDraw("s", "A", SEED))])
    lost = [e for e in drawn if getattr(e, "intent_id", None) != "i2" or isinstance(e, EntryQueued)]
    decided = [(0, k, record_name(e), to_record(e)) for k, e in enumerate(lost)]
    after = account_records(commands, decided, set(), "s")
    assert not after.holds and after.unaccounted == [(0, 2)]  # i2's decision is missing


def test_the_audit_reads_each_facts_time_from_the_command_topic_not_from_the_writer() -> None:
    from flashsale.sale_audit import SaleAudit, check_log_times
    from processors.records import record_name, to_record

    log: list[tuple[int, Command]] = [(0, OpenSale(terms(allocation=4)))]
    log += [(OPENS + n, intent(n, f"u{n}")) for n in range(5)]
    log += [(STARTS + 5, RevealDraw("s", "A", SEED)), (STARTS + 6, intent(9, "late"))]
    commands = []
    for at, cmd in log:
        if isinstance(cmd, PlaceIntent):
            commands.append(("PurchaseIntent", {"intent_id": cmd.intent_id, "sku": "A"}, at))
        elif isinstance(cmd, RevealDraw):
            commands.append(("RevealDraw", {"sku": "A"}, at))
    facts = [(record_name(e), to_record(e)) for e in run(log)]

    def kinds(items: list[tuple[str, dict[str, Any]]]) -> list[str]:
        out = SaleAudit("s")
        check_log_times(out, commands, items)
        return [v.kind for v in out.violations]

    assert kinds(facts) == []
    for tampered in ("EntryQueued", "DrawRevealed", "IntentAccepted"):
        at = next(i for i, (n, _) in enumerate(facts) if n == tampered)
        backdated = list(facts)  # e.g. an entry moved into the window by the writer
        backdated[at] = (tampered, {**facts[at][1], "decided_at": facts[at][1]["decided_at"] - 1})
        assert kinds(backdated) == ["log-time-mismatch"], tampered


def test_with_holds_and_a_waitlist_the_draw_waitlists_entries_at_their_rank() -> None:
    """Drawn entries that find no unit while units are held wait in the draw's order (then
    late arrivals), up to the depth; a unit that comes back goes to the best-ranked one."""
    from processors.core import StartPayment, Waitlisted
    from processors.records import record_name, to_record

    held = replace(terms(allocation=2), ends_at_ms=10_000, hold_ms=1_000, waitlist_depth=3)
    log: list[tuple[int, Command]] = [(0, OpenSale(held))]
    log += [(OPENS + n, intent(n, f"u{n}")) for n in range(5)]
    log += [(STARTS + 1, intent(9, "late"))]
    ledger = SkuLedger("A")
    events = run([*log, (STARTS + 2, RevealDraw("s", "A", SEED))], ledger)
    drawn = events[events.index(next(e for e in events if isinstance(e, DrawRevealed))) + 1 :]
    _, order = draw_order(SEED, [(f"u{n}", f"i{n}", 1) for n in range(5)])
    assert [(type(e).__name__, e.intent_id, getattr(e, "draw_rank", 0)) for e in drawn] == [  # type: ignore[union-attr]
        ("IntentAccepted", order[0][1], 1), ("IntentAccepted", order[1][1], 2),
        ("Waitlisted", order[2][1], 3), ("Waitlisted", order[3][1], 4),
        ("Waitlisted", order[4][1], 5), ("IntentRejected", "i9", 0)]  # fmt: skip
    assert [e.position for e in drawn if isinstance(e, Waitlisted)] == [1, 2, 3]
    assert drawn[-1].reason is RejectionReason.SOLD_OUT  # type: ignore[union-attr]  # full line
    # The first winner's payment comes too late: its unit goes to rank 3, undrawn by then.
    first = drawn[0]
    more = run([(STARTS + 2 + 1_000, StartPayment("s", "A", first.order_id, first.user_id,  # type: ignore[union-attr]
                                                   "a1"))], ledger)  # fmt: skip
    served = [e for e in more if isinstance(e, IntentAccepted)]
    assert [e.intent_id for e in served] == [order[2][1]]
    everything = [*events, *more]
    assert _audited(everything) == [] and _fairness(everything) == []
    # A draw that skipped a waitlisted entry's rank is named.
    at = next(i for i, e in enumerate(everything) if isinstance(e, Waitlisted))
    forged = [(record_name(e), to_record(e)) for e in everything]
    del forged[at]
    from flashsale.fairness import check_draw

    assert any("do not follow the draw" in p for p in check_draw("A", forged)[1])
