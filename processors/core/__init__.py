"""The pure decision core: ``decide(state, command, log_time) -> events``, ``evolve(state, event)``.

The single writer of a SKU feeds every command from its SKU-keyed input partition, in log
order, to ``decide``, then folds each returned event into the state with ``evolve``. Time is
the broker's log-append time of the command, never a clock. ``decide`` never changes the
ledger; ``evolve`` is the only thing that does (in place: the ledger is the writer's private
state and copying it per intent would dominate the hot path). The writer's rebuild, the
audit and the property tests fold the same ``evolve`` over the same events, so the state a
log describes is one function of it.

Rule families live in their own modules: ``sales`` (open, close, return, settle),
``intents`` (judged by the versioned ``rules`` of each sale) and ``prequeue`` (queued entries,
the commit-reveal draw, the sale clock's ticks) and ``lifecycle`` (holds, payments, expiry,
cancellation, the waitlist) and ``operations`` (the operator's pause, resume, added units,
cancel). ``progress``
names the events after which the writer says how far through its input it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from processors.core.intents import decide_place, evolve_accepted, evolve_rejected
from processors.core.intents import intent_digest as intent_digest
from processors.core.lifecycle import (
    decide_cancel,
    decide_record,
    decide_start,
    evolve_declined,
    evolve_paid,
    evolve_released,
    evolve_started,
    evolve_voided,
    evolve_waitlisted,
)
from processors.core.lifecycle import evolve_refused as evolve_order_refused
from processors.core.lifecycle_model import (
    CancelHold,
    Hold,
    HoldCancelled,
    HoldExpired,
    OrderPaid,
    OrderRefused,
    PaymentDeclined,
    PaymentStarted,
    PaymentVoided,
    RecordPayment,
    StartPayment,
    Waitlisted,
)
from processors.core.model import (
    CURRENT_RULES,
    CloseSale,
    Command,
    Decision,
    DrawRevealed,
    EntryQueued,
    Event,
    IntentAccepted,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    QueueExpired,
    QueueKind,
    QueueProgress,
    RejectionReason,
    ReturnUnits,
    RevealDraw,
    SaleBook,
    SaleClosed,
    SaleOpened,
    SaleRefused,
    SaleSettled,
    SaleTerms,
    SettleSale,
    SkuLedger,
    Tick,
    UnitsReturned,
    WrongLedger,
    intent_of_order,
    order_id_for,
)
from processors.core.operations import (
    decide_add,
    decide_cancel_sale,
    decide_pause,
    decide_resume,
    evolve_added,
    evolve_cancelled,
    evolve_deferred,
    evolve_paused,
    evolve_refunded,
    evolve_resumed,
)
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
from processors.core.prequeue import decide_reveal, decide_tick, evolve_drawn, evolve_queued
from processors.core.progress import progress_due
from processors.core.rules import RULES
from processors.core.sales import (
    decide_close,
    decide_open,
    decide_return,
    decide_settle,
    evolve_closed,
    evolve_opened,
    evolve_refused,
    evolve_returned,
    evolve_settled,
    terms_problem,
)

__all__ = [
    "CURRENT_RULES",
    "RULES",
    "AddUnits",
    "CancelHold",
    "CancelSale",
    "CloseSale",
    "Command",
    "Decision",
    "DrawRevealed",
    "EntryQueued",
    "Event",
    "Hold",
    "HoldCancelled",
    "HoldExpired",
    "IntentAccepted",
    "IntentDeferred",
    "IntentRejected",
    "OpenSale",
    "OrderPaid",
    "OrderRefunded",
    "OrderRefused",
    "PauseSale",
    "PaymentDeclined",
    "PaymentStarted",
    "PaymentVoided",
    "PlaceIntent",
    "QueueExpired",
    "QueueKind",
    "QueueProgress",
    "RecordPayment",
    "RejectionReason",
    "ResumeSale",
    "ReturnUnits",
    "RevealDraw",
    "SaleBook",
    "SaleCancelled",
    "SaleClosed",
    "SaleOpened",
    "SalePaused",
    "SaleRefused",
    "SaleResumed",
    "SaleSettled",
    "SaleTerms",
    "SettleSale",
    "SkuLedger",
    "StartPayment",
    "Tick",
    "UnitsAdded",
    "UnitsReturned",
    "Waitlisted",
    "WrongLedger",
    "decide",
    "evolve",
    "fold",
    "intent_digest",
    "intent_of_order",
    "order_id_for",
    "progress_due",
    "terms_problem",
]  # fmt: skip

_DECIDE: dict[type, Callable[[SkuLedger, Any, int], list[Any]]] = {
    PlaceIntent: decide_place,
    OpenSale: decide_open,
    CloseSale: decide_close,
    ReturnUnits: decide_return,
    SettleSale: decide_settle,
    RevealDraw: decide_reveal,
    Tick: decide_tick,
    StartPayment: decide_start,
    RecordPayment: decide_record,
    CancelHold: decide_cancel,
    PauseSale: decide_pause,
    ResumeSale: decide_resume,
    AddUnits: decide_add,
    CancelSale: decide_cancel_sale,
}
_EVOLVE: dict[type, Callable[[SkuLedger, Any], None]] = {
    IntentAccepted: evolve_accepted,
    IntentRejected: evolve_rejected,
    SaleOpened: evolve_opened,
    SaleRefused: evolve_refused,
    SaleClosed: evolve_closed,
    UnitsReturned: evolve_returned,
    SaleSettled: evolve_settled,
    EntryQueued: evolve_queued,
    DrawRevealed: evolve_drawn,
    QueueExpired: evolve_drawn,
    PaymentStarted: evolve_started,
    OrderRefused: evolve_order_refused,
    PaymentDeclined: evolve_declined,
    OrderPaid: evolve_paid,
    PaymentVoided: evolve_voided,
    HoldExpired: evolve_released,
    HoldCancelled: evolve_released,
    Waitlisted: evolve_waitlisted,
    SalePaused: evolve_paused,
    SaleResumed: evolve_resumed,
    IntentDeferred: evolve_deferred,
    UnitsAdded: evolve_added,
    SaleCancelled: evolve_cancelled,
    OrderRefunded: evolve_refunded,
}


def decide(ledger: SkuLedger, command: Command, log_time_ms: int) -> list[Event]:
    """The facts ``command`` (stamped with broker log time) makes true; ``ledger`` unchanged.

    PlaceIntent yields exactly one decision for a new intent id; a repeated intent id yields
    nothing (its one decision stands), settled sale or not. OpenSale yields SaleOpened once;
    with identical terms again nothing; with other or invalid terms (an unknown rules version
    included) a SaleRefused. CloseSale yields SaleClosed once; ReturnUnits UnitsReturned once
    per ref; SettleSale of a closed or ended sale SaleSettled once (while open, SaleRefused).
    Commands for an unknown sale other than PlaceIntent and OpenSale yield nothing.
    """
    if command.sku != ledger.sku:
        raise WrongLedger(f"command for {command.sku!r} sent to ledger of {ledger.sku!r}")
    rule = _DECIDE.get(type(command))
    if rule is None:
        raise TypeError(f"not a command: {command!r}")
    return rule(ledger, command, log_time_ms)


def evolve(ledger: SkuLedger, event: Event) -> SkuLedger:
    """``ledger`` with ``event`` applied (in place; returned for folding)."""
    if event.sku != ledger.sku:
        raise WrongLedger(f"event for {event.sku!r} applied to ledger of {ledger.sku!r}")
    apply = _EVOLVE.get(type(event))
    if apply is None:
        raise TypeError(f"not an event: {event!r}")
    apply(ledger, event)
    return ledger


def fold(ledger: SkuLedger, events: list[Event]) -> SkuLedger:
    """``evolve`` each event in order."""
    for event in events:
        evolve(ledger, event)
    return ledger
