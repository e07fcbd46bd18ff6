"""The operator's rule family: pause, resume, add units, cancel (``operations_model``).

- ``PauseSale`` of a started sale whose pre-queue (if any) is drawn: ``SalePaused``. Intents
  that arrive while it is paused (and before its end) are ``IntentDeferred`` in arrival
  order; holds, payments, expiry and the waitlist go on. Pausing again is a no-op; pausing
  a sale that is over, not started, or whose pre-queue is not drawn, is refused. An intent
  past the end of a sale still paused ends the pause first, then is decided.
- ``ResumeSale`` of a paused sale: ``SaleResumed``, then each deferred intent decided in
  arrival order by the sale's rules at this log time (accepted, waitlisted or rejected),
  exactly as if it had arrived now. The pause also ends, the same way, when the sale is
  closed, cancelled, settled, or a clock tick finds it over (then every one is rejected).
- ``AddUnits``: ``UnitsAdded`` once per ref (refs shared with ``ReturnUnits``), then the
  waitlist is served; refused for a sale that is over.
- ``CancelSale``: ``SaleCancelled`` (the sale is closed), then every hold released
  (``HoldCancelled``, by deadline), every paid order refunded (``OrderRefunded``, by order
  id), the waitlist rejected, the deferred intents decided (rejected: the sale is closed)
  and an undrawn pre-queue expired. Cancelling again is a no-op; a settled sale is refused.
  A sale without holds has nothing held or paid here: its accepted orders stand.

Invariant: remaining + held + paid = allocation + added + returned at every event.
"""

from __future__ import annotations

from copy import copy
from dataclasses import replace

from processors.core.intents import decide_place
from processors.core.lifecycle import serve_waitlist
from processors.core.lifecycle_model import HoldCancelled
from processors.core.model import Event, PlaceIntent, SaleBook, SaleRefused, SkuLedger
from processors.core.operations_model import (
    AddUnits,
    CancelSale,
    IntentDeferred,
    OrderRefunded,
    PauseSale,
    ResumeSale,
    SaleCancelled,
    SalePaused,
    SaleResumed,
    UnitsAdded,
)
from processors.core.prequeue import expire, has_ended


def _refused(cmd: PauseSale | AddUnits | CancelSale, detail: str, seq: int, now: int) -> Event:
    return SaleRefused(cmd.sale_id, cmd.sku, type(cmd).__name__, detail, seq, now)


def decide_pause(ledger: SkuLedger, cmd: PauseSale, now: int) -> list[Event]:
    """``SalePaused``, or why not; nothing when it is paused already or unknown."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or book.paused:
        return []
    seq = book.sequence + 1
    if book.settled or has_ended(book, now):
        return [_refused(cmd, "the sale is over", seq, now)]
    if now < book.terms.starts_at_ms:  # what waited would be judged at the resume, as if on
        # time: a pause before the start would let early intents win (open it later instead)
        return [_refused(cmd, "the sale has not started: open it later instead", seq, now)]
    if book.queueing:
        return [_refused(cmd, "the pre-queue is not drawn yet: pause after the draw", seq, now)]
    return [SalePaused(cmd.sale_id, cmd.sku, book.remaining, seq, now)]


def decide_resume(ledger: SkuLedger, cmd: ResumeSale, now: int) -> list[Event]:
    """``SaleResumed`` and the deferred intents' decisions; nothing unless it is paused."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or not book.paused:
        return []
    return unpause(ledger, cmd.sale_id, now, [])


def unpause(ledger: SkuLedger, sale_id: str, now: int, before: list[Event]) -> list[Event]:
    """The end of a pause after ``before`` (events of the same command, not folded yet):
    ``SaleResumed``, then every deferred intent decided in arrival order, each against the
    state the events ahead of it leave (decided on a copy: ``ledger`` is unchanged)."""
    from processors.core import evolve  # the dispatch table imports this module

    scratch = SkuLedger(ledger.sku, {sale_id: _copy(ledger.sales[sale_id])})
    for event in before:
        evolve(scratch, event)
    book = scratch.sales[sale_id]
    line = book.deferred
    resumed = SaleResumed(sale_id, ledger.sku, len(line), book.sequence + 1, now)
    evolve(scratch, resumed)
    events: list[Event] = [resumed]
    for intent_id, user_id, quantity in line:
        for event in decide_place(scratch, PlaceIntent(intent_id, user_id, sale_id, ledger.sku,
                                                       quantity), now):  # fmt: skip
            evolve(scratch, event)
            events.append(event)
    return events


def _copy(book: SaleBook) -> SaleBook:
    """A copy of ``book`` whose evolving leaves ``book`` as it is (settled digests shared:
    nothing changes them before settlement)."""
    copied = {name: copy(getattr(book, name)) for name in _CONTAINERS}
    return replace(book, **copied)


_CONTAINERS = ("bought", "decided", "returns", "queue", "queued_ids", "entrants", "holds",
               "orders", "attempts", "paid", "waitlist", "waitlisted_ids", "deferred",
               "deferred_ids")  # fmt: skip


def decide_add(ledger: SkuLedger, cmd: AddUnits, now: int) -> list[Event]:
    """``UnitsAdded`` once per ref, then what the waitlist does with the units."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or cmd.quantity <= 0 or cmd.ref in book.returns:
        return []
    seq = book.sequence + 1
    if book.settled or has_ended(book, now):
        return [_refused(cmd, "the sale is over", seq, now)]
    added = UnitsAdded(cmd.sale_id, cmd.sku, cmd.ref, cmd.quantity,
                       book.terms.allocation + book.added + cmd.quantity,
                       book.remaining + cmd.quantity, seq, now)  # fmt: skip
    if not book.waitlist:
        return [added]
    return [added, *serve_waitlist(book, cmd.sale_id, cmd.sku, now, seq, added.remaining,
                                   len(book.holds))]  # fmt: skip


def decide_cancel_sale(ledger: SkuLedger, cmd: CancelSale, now: int) -> list[Event]:
    """``SaleCancelled`` and everything it releases, refunds and decides."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None:
        return []
    seq = book.sequence + 1
    if book.settled:  # (first: a settled book's state does not keep "cancelled")
        return [_refused(cmd, "the sale is settled", seq, now)]
    if book.cancelled:
        return []
    sale_id, sku = cmd.sale_id, cmd.sku
    remaining = book.remaining
    events: list[Event] = [SaleCancelled(sale_id, sku, cmd.reason, remaining, seq, now)]
    for _, order_id in sorted((h.pay_by, o) for o, h in book.holds.items()):
        hold = book.holds[order_id]
        seq, remaining = seq + 1, remaining + hold.quantity
        events.append(HoldCancelled(sale_id, sku, order_id, hold.user_id, hold.quantity,
                                    remaining, seq, now))  # fmt: skip
    for order_id in sorted(book.paid):
        paid = book.paid[order_id]
        seq, remaining = seq + 1, remaining + paid.quantity
        events.append(OrderRefunded(sale_id, sku, order_id, paid.attempt or "", paid.user_id,
                                    paid.quantity, remaining, seq, now))  # fmt: skip
    if book.waitlist:
        events += serve_waitlist(book, sale_id, sku, now, seq, remaining, 0, ended=True)
    if book.paused:
        events += unpause(ledger, sale_id, now, events)
    if book.queueing:
        events += expire(book, sale_id, sku, now, "the sale was cancelled before the draw",
                         events[-1].sequence + 1)  # fmt: skip
    return events


# -- evolve -----------------------------------------------------------------------------


def evolve_paused(ledger: SkuLedger, event: SalePaused) -> None:
    book = ledger.sales[event.sale_id]
    book.paused, book.sequence = True, event.sequence


def evolve_resumed(ledger: SkuLedger, event: SaleResumed) -> None:
    """The pause is over; the decisions that follow decide every deferred intent."""
    book = ledger.sales[event.sale_id]
    book.paused, book.deferred, book.deferred_ids = False, [], set()
    book.sequence = event.sequence


def evolve_deferred(ledger: SkuLedger, event: IntentDeferred) -> None:
    book = ledger.sales[event.sale_id]
    book.deferred.append((event.intent_id, event.user_id, event.quantity))
    book.deferred_ids.add(event.intent_id)
    book.sequence = event.sequence


def evolve_added(ledger: SkuLedger, event: UnitsAdded) -> None:
    book = ledger.sales[event.sale_id]
    book.added += event.quantity
    book.remaining, book.sequence = event.remaining, event.sequence
    book.returns.add(event.ref)


def evolve_cancelled(ledger: SkuLedger, event: SaleCancelled) -> None:
    book = ledger.sales[event.sale_id]
    book.closed = book.cancelled = True
    book.sequence = event.sequence


def evolve_refunded(ledger: SkuLedger, event: OrderRefunded) -> None:
    book = ledger.sales[event.sale_id]
    del book.paid[event.order_id]
    book.orders[event.order_id] = "refunded"
    if event.attempt_id:
        book.attempts[event.attempt_id] = "refunded"
    book.remaining, book.sequence = event.remaining, event.sequence
