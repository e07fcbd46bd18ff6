"""The sale audit's rules check: every event decided again by the core.

The core's ``evolve`` is folded over a (sale, SKU)'s events in sequence order, and ``decide``
is asked what each event's command (rebuilt from the event: an intent from its decision, an
opening from its terms, a payment's result from its outcome, ...) yields at the event's log
time under the sale's rules version: what the rules would not have decided is a
``rules-mismatch``.
"""

from __future__ import annotations

from typing import Any

from processors.core import (
    AddUnits,
    CancelHold,
    CancelSale,
    CloseSale,
    Command,
    DrawRevealed,
    EntryQueued,
    Event,
    HoldCancelled,
    HoldExpired,
    IntentAccepted,
    IntentDeferred,
    IntentRejected,
    OpenSale,
    OrderPaid,
    OrderRefunded,
    OrderRefused,
    PauseSale,
    PaymentDeclined,
    PaymentStarted,
    PaymentVoided,
    PlaceIntent,
    QueueExpired,
    RecordPayment,
    ResumeSale,
    ReturnUnits,
    RevealDraw,
    SaleCancelled,
    SaleClosed,
    SaleOpened,
    SalePaused,
    SaleResumed,
    SaleSettled,
    SettleSale,
    SkuLedger,
    StartPayment,
    Tick,
    UnitsAdded,
    UnitsReturned,
    Waitlisted,
    decide,
    evolve,
)
from processors.core.lifecycle import overdue, serve_waitlist
from processors.records import event_from_record


def check_rules(sku: str, items: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    """Re-decide every event of one (sale, SKU) from the state its predecessors fold to.

    A command may yield several events (a reveal: the draw and every queued intent's decision
    in the draw's order; a close or the end of a pre-queue sale: the queue's expiry): the
    events the rules yield must be exactly the next ones in the log (a release or a payment:
    then what the waitlist does). So the draw is
    recomputed from the queued entries the log holds and the seed it revealed, checked
    against the sale's commitment, and every drawn decision must follow it.
    """
    found: list[tuple[str, str]] = []
    ledger = SkuLedger(sku)
    events = [event_from_record(name, rec) for name, rec in items]
    i = 0
    while i < len(events):
        event, rec = events[i], items[i][1]
        command = command_for(event)
        group = [event]
        if command is not None:
            try:
                again = _waitlist_moves(ledger, event)
                if again is None:
                    again = decide(ledger, command, event.decided_at)
                said = ", ".join(map(str, again[:3])) if again else "nothing"
            except (KeyError, ValueError) as exc:  # e.g. a rules version this build lacks
                again, said = [], f"an error: {exc!r}"
            if again and again == events[i : i + len(again)]:
                group = again
            elif isinstance(event, HoldExpired) and _expires_alone(ledger, event, events[i + 1 :]):
                pass  # the one hold an order command found overdue (``lifecycle.decide_*``)
            else:
                found.append((
                    "rules-mismatch", f"{sku} #{rec['sequence']}: the log says {event}; "
                    f"the rules (version {_version(ledger, event)}) say {said}"))  # fmt: skip
        for k, folded in enumerate(group):
            try:
                evolve(ledger, folded)
            except (KeyError, ValueError) as exc:  # e.g. a decision for a sale never opened
                where = f"{sku} #{items[i + k][1]['sequence']}"
                name = items[i + k][0]
                found.append(("unfoldable", f"{where}: {name} fails: {exc!r}"))
        i += len(group)
    return found


def _waitlist_moves(ledger: SkuLedger, event: Event) -> list[Event] | None:
    """For the decision of a waitlisted intent: what the line does at that point (served in
    order, or everyone told when no hold is left), else None. It follows the events of the
    command that moved it (a release or a payment), whichever command that was."""
    book = ledger.sales.get(event.sale_id)
    intent_id = getattr(event, "intent_id", None)
    if book is None or intent_id is None or intent_id not in book.waitlisted_ids:
        return None
    return serve_waitlist(book, event.sale_id, event.sku, event.decided_at, book.sequence,
                          book.remaining, len(book.holds))  # fmt: skip


def _expires_alone(ledger: SkuLedger, event: HoldExpired, after: list[Event]) -> bool:
    """Whether ``event`` is what a payment started too late says of its own overdue hold:
    that hold, overdue by then, its units back, and the refusal of that payment next (a
    tick expires every overdue hold, so a lone expiry anywhere else is not the rules')."""
    nxt = after[0] if after else None
    if not (isinstance(nxt, OrderRefused) and nxt.order_id == event.order_id
            and nxt.command == "StartPayment"):  # fmt: skip
        return False
    book = ledger.sales.get(event.sale_id)
    hold = None if book is None else book.holds.get(event.order_id)
    if book is None or hold is None or not overdue(book, hold, event.decided_at):
        return False
    return event == HoldExpired(event.sale_id, event.sku, event.order_id, hold.user_id,
                                hold.quantity, book.remaining + hold.quantity,
                                book.sequence + 1, event.decided_at)  # fmt: skip


def _version(ledger: SkuLedger, event: Event) -> int | str:
    book = ledger.sales.get(event.sale_id)
    return book.terms.rules if book is not None else "-"


def command_for(event: Event) -> Command | None:
    """The command that yields ``event``, rebuilt from it (None for a refused command)."""
    if isinstance(event, IntentAccepted | IntentRejected):
        return PlaceIntent(event.intent_id, event.user_id, event.sale_id, event.sku,
                           event.quantity)  # fmt: skip
    if isinstance(event, SaleOpened):
        return OpenSale(event.terms)
    if isinstance(event, SaleClosed):
        return CloseSale(event.sale_id, event.sku)
    if isinstance(event, UnitsReturned):
        return ReturnUnits(event.sale_id, event.sku, event.requested, event.ref)
    if isinstance(event, SaleSettled):
        return SettleSale(event.sale_id, event.sku)
    if isinstance(event, EntryQueued | Waitlisted | IntentDeferred):
        return PlaceIntent(event.intent_id, event.user_id, event.sale_id, event.sku,
                           event.quantity)  # fmt: skip
    if isinstance(event, DrawRevealed):
        return RevealDraw(event.sale_id, event.sku, event.seed)
    if isinstance(event, QueueExpired | HoldExpired):
        return Tick(event.sku)  # whatever command saw the end, the expiry is the same
    if isinstance(event, PaymentStarted):
        return StartPayment(event.sale_id, event.sku, event.order_id, event.user_id,
                            event.attempt_id)  # fmt: skip
    if isinstance(event, OrderPaid | PaymentVoided | PaymentDeclined):
        return RecordPayment(event.sale_id, event.sku, event.order_id, event.attempt_id,
                             type(event) is not PaymentDeclined)  # fmt: skip
    if isinstance(event, HoldCancelled):
        return CancelHold(event.sale_id, event.sku, event.order_id, event.user_id)
    return _operator_command(event)


def _operator_command(event: Event) -> Command | None:
    """The operator's command behind ``event`` (a refund only ever follows a cancel: alone
    it is re-decided as one, and found not to be what a cancel yields)."""
    if isinstance(event, SalePaused):
        return PauseSale(event.sale_id, event.sku)
    if isinstance(event, SaleResumed):
        return ResumeSale(event.sale_id, event.sku)
    if isinstance(event, UnitsAdded):
        return AddUnits(event.sale_id, event.sku, event.quantity, event.ref)
    if isinstance(event, SaleCancelled):
        return CancelSale(event.sale_id, event.sku, event.reason)
    if isinstance(event, OrderRefunded):
        return CancelSale(event.sale_id, event.sku, "")
    return None
