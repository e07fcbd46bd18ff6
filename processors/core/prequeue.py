"""The pre-queue rule family: queue intents before the start, draw them once the seed is out.

A sale with a pre-queue (``SaleTerms.prequeue_opens_at_ms``) queues every intent that arrives
in ``[prequeue_opens_at, starts_at)`` by log time: ``EntryQueued``, not a decision. A person's
first intent in the window is their one entry; their other intents in it are queued as
repeats, rejected ``ALREADY_QUEUED`` at the draw. Intents arriving after the start but before
the reveal are queued as late arrivals: nothing is decided out of order.

The draw (``RevealDraw``, written by the sale clock at the start) is accepted only at or after
``starts_at`` by log time and only with the seed whose SHA-256 is the sale's commitment
(otherwise ``SaleRefused``). Then ``DrawRevealed`` names the seed and a digest of the final
entry set; the entries are decided in ``draw_order`` (each decision carries its rank k of n),
the repeats are rejected, and the late arrivals are decided in log order behind them, all by
the sale's rules version. If the sale ends (or is closed) undrawn, ``QueueExpired`` and a
``DRAW_NOT_REVEALED`` rejection per queued intent follow at the first command past the end.

Anyone holding the log recomputes ``draw_order`` from ``DrawRevealed`` and the
``EntryQueued`` facts (``flashsale.fairness``).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import replace

from processors.core.lifecycle import expire_due, pay_by, serve_waitlist, waitlisted
from processors.core.lifecycle_model import Hold, Waitlisted
from processors.core.model import (
    Decision,
    DrawRevealed,
    EntryQueued,
    Event,
    IntentAccepted,
    IntentRejected,
    PlaceIntent,
    QueueExpired,
    QueueKind,
    RejectionReason,
    RevealDraw,
    SaleBook,
    SaleRefused,
    SkuLedger,
    Tick,
    order_id_for,
)
from processors.core.rules import RULES

SEED_BYTES = 32
_DRAW_KEY_PERSON = b"fs-draw-v1"


def commitment(seed: str) -> str:
    """The commitment a sale opens with: hex SHA-256 of the seed's bytes (the seed is hex)."""
    return hashlib.sha256(bytes.fromhex(seed)).hexdigest()


def is_sha256_hex(text: str) -> bool:
    """Whether ``text`` is 32 bytes in lowercase hex (a seed, a commitment)."""
    return len(text) == 2 * SEED_BYTES and all(c in "0123456789abcdef" for c in text)


def seed_problem(seed: str, committed: str | None) -> str | None:
    """Why ``seed`` cannot be the sale's revealed seed, or None."""
    if not is_sha256_hex(seed):
        return f"the seed must be {2 * SEED_BYTES} lowercase hex characters"
    if committed is None or not hmac.compare_digest(commitment(seed), committed):
        return "the seed does not match the sale's commitment"
    return None


def entries_digest(entries: Iterable[tuple[str, str, int]]) -> str:
    """Hex SHA-256 of the entry set: (user id, intent id, quantity) lines sorted by user."""
    h = hashlib.sha256()
    for user_id, intent_id, quantity in sorted(entries):
        h.update(f"{user_id}\x1f{intent_id}\x1f{quantity}\n".encode())
    return h.hexdigest()


def draw_key(seed: str, digest: str, user_id: str) -> bytes:
    """An entrant's place in the draw: BLAKE2b keyed with the seed over (digest, entrant)."""
    return hashlib.blake2b(
        f"{digest}\x1f{user_id}".encode(),
        key=bytes.fromhex(seed),
        digest_size=32,
        person=_DRAW_KEY_PERSON,
    ).digest()


def draw_order(
    seed: str, entries: Iterable[tuple[str, str, int]]
) -> tuple[str, list[tuple[str, str, int]]]:
    """(entries digest, entries in draw order) for (user id, intent id, quantity) entries."""
    listed = list(entries)
    digest = entries_digest(listed)
    keyed = sorted((draw_key(seed, digest, e[0]), e[0], e) for e in listed)
    return digest, [e for _, _, e in keyed]


def has_ended(book: SaleBook, now: int) -> bool:
    """Whether the sale is over by log time ``now`` (ended or closed)."""
    return book.closed or now >= book.terms.ends_at_ms


def expire(
    book: SaleBook, sale_id: str, sku: str, now: int, detail: str, seq: int | None = None
) -> list[Event]:
    """``QueueExpired`` and a ``DRAW_NOT_REVEALED`` rejection per queued intent, numbered
    from ``seq`` (the book's next sequence by default)."""
    seq = book.sequence + 1 if seq is None else seq
    events: list[Event] = [QueueExpired(sale_id, sku, len(book.entrants), len(book.queue), seq,
                                        now)]  # fmt: skip
    for intent_id, user_id, quantity, _ in book.queue:
        seq += 1
        events.append(IntentRejected(intent_id, sale_id, sku, user_id, quantity,
                                     RejectionReason.DRAW_NOT_REVEALED, detail, book.remaining,
                                     seq, now))  # fmt: skip
    return events


def decide_queued(book: SaleBook, cmd: PlaceIntent, now: int) -> list[Event]:
    """An intent of a sale whose pre-queue is not drawn yet (``book.queueing``)."""
    terms = book.terms
    opens = terms.prequeue_opens_at_ms if terms.prequeue_opens_at_ms is not None else -1
    seq = book.sequence + 1
    q = cmd.quantity
    if now >= opens and not has_ended(book, now) and 0 < q <= terms.per_order_max:
        if now >= terms.starts_at_ms:
            kind = QueueKind.LATE
        elif cmd.user_id in book.entrants:
            kind = QueueKind.REPEAT
        else:
            kind = QueueKind.ENTRY
        entrants = len(book.entrants) + (kind is QueueKind.ENTRY)
        return [EntryQueued(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id, q, kind,
                            entrants, len(book.queue) + 1, seq, now)]  # fmt: skip
    # What no order can change is decided at once: a bad quantity, before the window, or
    # after the end (the queue expires first, then the intent is decided).
    events: list[Event] = []
    if has_ended(book, now):
        events = expire(book, cmd.sale_id, cmd.sku, now, "the sale ended before the draw")
        seq += len(events)
    fault = RULES[terms.rules](book, cmd, now)
    if fault is None:  # cannot happen: before the window or after the end rules refuse
        raise AssertionError(f"{cmd.intent_id}: no rule refused an intent outside the queue")
    return [*events, _rejected(cmd, fault[0], fault[1], book.remaining, seq, now)]


def decide_reveal(ledger: SkuLedger, cmd: RevealDraw, now: int) -> list[Event]:
    """The draw once; a refusal for an early or wrong seed; nothing for a repeat."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or book.settled or book.queue_done:
        return []  # unknown sale, or drawn (or expired) already: one draw per sale
    seq = book.sequence + 1
    terms = book.terms
    if terms.prequeue_opens_at_ms is None:
        return [SaleRefused(cmd.sale_id, cmd.sku, "RevealDraw", "the sale has no pre-queue",
                            seq, now)]  # fmt: skip
    if has_ended(book, now):
        return expire(book, cmd.sale_id, cmd.sku, now, "the sale ended before the draw")
    if now < terms.starts_at_ms:
        return [SaleRefused(cmd.sale_id, cmd.sku, "RevealDraw",
                            f"revealed before the start ({terms.starts_at_ms})", seq,
                            now)]  # fmt: skip
    problem = seed_problem(cmd.seed, terms.draw_commitment)
    if problem is not None:
        return [SaleRefused(cmd.sale_id, cmd.sku, "RevealDraw", problem, seq, now)]
    return draw(book, cmd.sale_id, cmd.sku, cmd.seed, now)


def draw(book: SaleBook, sale_id: str, sku: str, seed: str, now: int) -> list[Event]:
    """``DrawRevealed`` and every queued intent's decision, in the draw's order."""
    entries = [(user, intent, q) for intent, user, q, kind in book.queue if kind == "ENTRY"]
    digest, order = draw_order(seed, entries)
    n = len(order)
    seq = book.sequence + 1
    events: list[Event] = [DrawRevealed(sale_id, sku, seed, n, digest, seq, now)]
    # Decided against a scratch book: the events are folded into the real one afterwards. It
    # keeps the holds and the waitlist the draw makes (a sale with holds and a waitlist: an
    # entry that finds no unit while units are held waits in line, in the draw's order).
    scratch = SaleBook(book.terms, book.remaining, book.closed, book.sequence,
                       bought=dict(book.bought), holds=dict(book.holds),
                       waitlist=list(book.waitlist))  # fmt: skip
    rules = RULES[book.terms.rules]
    for rank, (user_id, intent_id, q) in enumerate(order, 1):
        seq += 1
        cmd = PlaceIntent(intent_id, user_id, sale_id, sku, q)
        events.append(_decided(scratch, cmd, rules(scratch, cmd, now), seq, now, rank, n))
    for intent_id, user_id, q, kind in book.queue:
        if kind == "REPEAT":
            seq += 1
            cmd = PlaceIntent(intent_id, user_id, sale_id, sku, q)
            events.append(_rejected(cmd, RejectionReason.ALREADY_QUEUED,
                                    "this person already has an entry in the draw",
                                    scratch.remaining, seq, now))  # fmt: skip
    for intent_id, user_id, q, kind in book.queue:
        if kind == "LATE":
            seq += 1
            cmd = PlaceIntent(intent_id, user_id, sale_id, sku, q)
            events.append(_decided(scratch, cmd, rules(scratch, cmd, now), seq, now, 0, 0))
    return events


def decide_tick(ledger: SkuLedger, cmd: Tick, now: int) -> list[Event]:
    """Expire every pre-queue of the ledger that is over by ``now`` and still undrawn, and
    every hold past its deadline (``processors.core.lifecycle``); end the pause of a sale
    that is over (``processors.core.operations``)."""
    from processors.core.operations import unpause  # it imports this module

    events: list[Event] = []
    for sale_id, book in ledger.sales.items():
        if book.queueing and has_ended(book, now):
            events += expire(book, sale_id, ledger.sku, now, "the sale ended before the draw")
        expired = expire_due(book, sale_id, ledger.sku, now) if book.holds else []
        if not expired and book.waitlist and has_ended(book, now):  # the line ends with it
            expired = serve_waitlist(book, sale_id, ledger.sku, now, book.sequence,
                                     book.remaining, len(book.holds))  # fmt: skip
        if book.paused and has_ended(book, now):  # and the pause: what waited is decided
            expired += unpause(ledger, sale_id, now, expired)
        events += expired
    return events


def _decided(
    scratch: SaleBook,
    cmd: PlaceIntent,
    fault: tuple[RejectionReason, str] | None,
    seq: int,
    now: int,
    rank: int,
    size: int,
) -> Decision | Waitlisted:
    if fault is not None:
        waiting = waitlisted(scratch, cmd, fault[0], now) if scratch.terms.waitlist_depth else None
        if waiting is not None:
            scratch.waitlist.append((cmd.intent_id, cmd.user_id, cmd.quantity))
            return replace(waiting, sequence=seq, draw_rank=rank, draw_size=size)
        return _rejected(cmd, fault[0], fault[1], scratch.remaining, seq, now, rank, size)
    scratch.remaining -= cmd.quantity
    scratch.bought[cmd.user_id] = scratch.bought.get(cmd.user_id, 0) + cmd.quantity
    accepted = IntentAccepted(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id, cmd.quantity,
                              order_id_for(cmd.intent_id), scratch.remaining, seq, now, rank,
                              size, pay_by(scratch, now))  # fmt: skip
    if accepted.pay_by:  # held: a unit that may come back, to the line behind it
        scratch.holds[accepted.order_id] = Hold(cmd.intent_id, cmd.user_id, cmd.quantity,
                                                accepted.pay_by)  # fmt: skip
    return accepted


def _rejected(
    cmd: PlaceIntent,
    reason: RejectionReason,
    detail: str,
    remaining: int,
    seq: int,
    now: int,
    rank: int = 0,
    size: int = 0,
) -> IntentRejected:
    return IntentRejected(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id, cmd.quantity,
                          reason, detail, remaining, seq, now, rank, size)  # fmt: skip


def evolve_queued(ledger: SkuLedger, event: EntryQueued) -> None:
    """The intent waits in the queue; an entry takes its person's one chance."""
    book = ledger.sales[event.sale_id]
    book.queue.append((event.intent_id, event.user_id, event.quantity, event.kind.value))
    book.queued_ids.add(event.intent_id)
    if event.kind is QueueKind.ENTRY:
        book.entrants.add(event.user_id)
    book.sequence = event.sequence


def evolve_drawn(ledger: SkuLedger, event: DrawRevealed | QueueExpired) -> None:
    """The queue is resolved: the decisions that follow decide every queued intent."""
    book = ledger.sales[event.sale_id]
    book.queue, book.queued_ids, book.entrants = [], set(), set()
    book.queue_done = True
    book.sequence = event.sequence


__all__ = [
    "commitment", "decide_queued", "decide_reveal", "decide_tick", "draw", "draw_order",
    "entries_digest", "evolve_drawn", "evolve_queued", "expire", "is_sha256_hex", "seed_problem",
]  # fmt: skip
