"""The intent rule family: ``PlaceIntent`` in, one ``IntentAccepted``/``IntentRejected`` out
(or, for a sale whose pre-queue is not drawn yet, ``EntryQueued``: ``processors.core.prequeue``).

Every intent of a sale is judged by the rules version its terms name (``processors.core.rules``).

An intent id decided once is remembered (as a member of a set, not its decision): a repeat
of it, whether a client retry or a producer retry, yields no event at all, so the committed
decision log holds exactly one decision per intent id.
"""

from __future__ import annotations

import hashlib

from processors.core.lifecycle import evolve_held, leave_waitlist, pay_by, waitlisted
from processors.core.model import (
    Event,
    IntentAccepted,
    IntentRejected,
    PlaceIntent,
    RejectionReason,
    SaleBook,
    SkuLedger,
    order_id_for,
)
from processors.core.operations_model import IntentDeferred
from processors.core.prequeue import decide_queued, has_ended
from processors.core.rules import RULES


def intent_digest(intent_id: str) -> int:
    """64-bit digest of an intent id, kept for settled sales."""
    return int.from_bytes(hashlib.blake2b(intent_id.encode(), digest_size=8).digest(), "big")


def _known(ledger: SkuLedger, book: SaleBook | None, intent_id: str) -> bool:
    if intent_id in ledger.orphans or (book is not None and intent_id in book.decided):
        return True
    if book is not None and intent_id in book.queued_ids:
        return True  # queued: its one decision comes with the draw
    if book is not None and intent_id in book.waitlisted_ids:
        return True  # waitlisted: its one decision comes when a unit returns (or cannot)
    if book is not None and intent_id in book.deferred_ids:
        return True  # deferred by a pause: its one decision comes when the pause ends
    if book is not None and book.settled and intent_digest(intent_id) in book.settled_digests:
        return True  # decided before settlement: that decision stands, none is added
    # Intent ids embed the sale, so only a forged or corrupted record reaches this loop with
    # a known id; treating it as a repeat keeps "one decision per intent id".
    return any(intent_id in other.decided for other in ledger.sales.values())


def decide_place(ledger: SkuLedger, cmd: PlaceIntent, now: int) -> list[Event]:
    """The intent's one decision, or nothing for an intent id already decided (or queued);
    for a sale with an undrawn pre-queue, see ``processors.core.prequeue``."""
    book = ledger.sales.get(cmd.sale_id)
    if _known(ledger, book, cmd.intent_id):
        return []  # a repeat: its one decision is already in the log
    if book is None:
        seq = ledger.orphan_sequences.get(cmd.sale_id, 0) + 1
        return [IntentRejected(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id, cmd.quantity,
                               RejectionReason.UNKNOWN_SALE, "no such sale for this SKU", 0,
                               seq, now)]  # fmt: skip
    if book.queueing:
        return decide_queued(book, cmd, now)
    if book.paused:
        if not has_ended(book, now):  # waits for the pause to end
            return [IntentDeferred(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id,
                                   cmd.quantity, len(book.deferred) + 1, book.sequence + 1,
                                   now)]  # fmt: skip
        return _after_the_pause(ledger, book, cmd, now)
    seq = book.sequence + 1
    fault = RULES[book.terms.rules](book, cmd, now)
    if fault is None:
        return [IntentAccepted(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id, cmd.quantity,
                               order_id_for(cmd.intent_id), book.remaining - cmd.quantity, seq,
                               now, pay_by=pay_by(book, now))]  # fmt: skip
    waiting = waitlisted(book, cmd, fault[0], now) if book.terms.waitlist_depth else None
    if waiting is not None:
        return [waiting]
    return [IntentRejected(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id, cmd.quantity,
                           fault[0], fault[1], book.remaining, seq, now)]  # fmt: skip


def _after_the_pause(ledger: SkuLedger, book: SaleBook, cmd: PlaceIntent, now: int) -> list[Event]:
    """An intent past the end of a sale still paused: the pause ends first (what waited is
    decided, in arrival order), then this intent, so nothing is decided out of order. Past
    the end every one of them is rejected: nothing changes the stock or anyone's count."""
    from processors.core.operations import unpause  # it imports this module

    ended = unpause(ledger, cmd.sale_id, now, [])
    fault = RULES[book.terms.rules](book, cmd, now)
    if fault is None:  # cannot happen: past the end the rules refuse
        raise AssertionError(f"{cmd.intent_id}: no rule refused an intent past the end")
    return [*ended, IntentRejected(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id,
                                   cmd.quantity, fault[0], fault[1], book.remaining,
                                   ended[-1].sequence + 1, now)]  # fmt: skip


def evolve_accepted(ledger: SkuLedger, event: IntentAccepted) -> None:
    """The units left the sale and count against the user's limit; in a sale with holds
    its order is held until ``pay_by``."""
    book = ledger.sales[event.sale_id]
    book.remaining = event.remaining
    book.sequence = event.sequence
    book.bought[event.user_id] = book.bought.get(event.user_id, 0) + event.quantity
    book.decided.add(event.intent_id)
    if event.pay_by:
        evolve_held(book, event)
    if book.waitlisted_ids and event.intent_id in book.waitlisted_ids:
        leave_waitlist(book, event.intent_id)


def evolve_rejected(ledger: SkuLedger, event: IntentRejected) -> None:
    """The intent is decided; a rejection for a sale without a book is an orphan."""
    book = ledger.sales.get(event.sale_id)
    if book is None:
        ledger.orphan_sequences[event.sale_id] = event.sequence
        ledger.orphans.add(event.intent_id)
        return
    book.sequence = event.sequence
    book.decided.add(event.intent_id)
    if book.waitlisted_ids and event.intent_id in book.waitlisted_ids:
        leave_waitlist(book, event.intent_id)
