"""Mapping between decision-core types and Avro record dicts.

``to_record`` gives an event's body fields (the shell adds the envelope: event_id,
correlation_id, producer, occurred_at); ``event_from_record`` and ``command_from_record``
read decoded records back (extra keys such as the envelope are ignored). Timestamps are
epoch milliseconds on both sides.
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
    QueueKind,
    QueueProgress,
    RecordPayment,
    RejectionReason,
    ResumeSale,
    ReturnUnits,
    RevealDraw,
    SaleCancelled,
    SaleClosed,
    SaleOpened,
    SalePaused,
    SaleRefused,
    SaleResumed,
    SaleSettled,
    SaleTerms,
    SettleSale,
    StartPayment,
    Tick,
    UnitsAdded,
    UnitsReturned,
    Waitlisted,
)

FIRST_RULES = 1
ENVELOPE_FIELDS = ("event_id", "correlation_id", "producer", "occurred_at")
COMMAND_RECORDS = frozenset({"OpenSale", "CloseSale", "SettleSale", "ReturnUnits",
                             "PurchaseIntent", "RevealDraw", "ClockTick", "StartPayment",
                             "RecordPayment", "CancelHold", "PauseSale", "ResumeSale",
                             "AddUnits", "CancelSale"})  # fmt: skip
"""Records of the SKU command topic."""
TICK = "ClockTick"
"""The one command that is not a SKU's: the writer hands it to every ledger of its partition."""
DECISION_RECORDS = frozenset({"IntentAccepted", "IntentRejected"})
EVENT_RECORDS = DECISION_RECORDS | {"SaleOpened", "SaleRefused", "SaleClosed", "UnitsReturned",
                                    "SaleSettled", "EntryQueued", "DrawRevealed",
                                    "QueueExpired", "PaymentStarted", "OrderRefused",
                                    "PaymentDeclined", "OrderPaid", "PaymentVoided",
                                    "HoldExpired", "HoldCancelled", "Waitlisted",
                                    "SalePaused", "SaleResumed", "IntentDeferred",
                                    "UnitsAdded", "SaleCancelled", "OrderRefunded"}  # fmt: skip
"""Records of the decisions topic that are a (sale, SKU)'s numbered facts."""
PROGRESS = "QueueProgress"
"""The decisions topic's one record that is not a numbered fact (see ``QueueProgress``)."""


def record_name(event: Event) -> str:
    """Avro record name of an event."""
    return type(event).__name__


def to_record(event: Event | QueueProgress) -> dict[str, Any]:
    """Avro body fields of an event (no envelope)."""
    if type(event) is SaleOpened:
        t = event.terms
        return {"sale_id": t.sale_id, "sku": t.sku, "allocation": t.allocation,
                "per_user_limit": t.per_user_limit, "per_order_max": t.per_order_max,
                "starts_at": t.starts_at_ms, "ends_at": t.ends_at_ms, "rules_version": t.rules,
                "sequence": event.sequence, "decided_at": event.decided_at,
                "prequeue_opens_at": t.prequeue_opens_at_ms,
                "draw_commitment": t.draw_commitment,
                "progress_every": t.progress_every, "hold_ms": t.hold_ms,
                "pay_grace_ms": t.pay_grace_ms, "waitlist_depth": t.waitlist_depth}  # fmt: skip
    if isinstance(event, IntentAccepted | IntentRejected):
        record: dict[str, Any] = {
            "intent_id": event.intent_id,
            "sale_id": event.sale_id,
            "sku": event.sku,
            "user_id": event.user_id,
            "quantity": event.quantity,
        }
        if isinstance(event, IntentAccepted):
            record["order_id"] = event.order_id
            record["pay_by"] = event.pay_by
        else:
            record["reason"] = event.reason.value
            record["detail"] = event.detail
        record["remaining"] = event.remaining
        record["sequence"] = event.sequence
        record["decided_at"] = event.decided_at
        record["draw_rank"] = event.draw_rank
        record["draw_size"] = event.draw_size
        return record
    if type(event) is EntryQueued:
        return {**{name: getattr(event, name) for name in event.__slots__},
                "kind": event.kind.value}  # fmt: skip
    # The other facts are flat: their fields are the record's, in order.
    return {name: getattr(event, name) for name in event.__slots__}


def terms_from_record(record: dict[str, Any]) -> SaleTerms:
    """Sale terms from an OpenSale or SaleOpened record."""
    r = record
    rules = r.get("rules_version")
    # A record without a version is version 1, always: never "whatever is current when it is
    # read", or a rebuild after a rules change would judge an old sale by the new rules.
    return SaleTerms(r["sale_id"], r["sku"], r["allocation"], r["per_user_limit"],
                     r["per_order_max"], r["starts_at"], r["ends_at"],
                     FIRST_RULES if rules is None else rules, r.get("prequeue_opens_at"),
                     r.get("draw_commitment"), r.get("progress_every"), r.get("hold_ms"),
                     r.get("pay_grace_ms") or 0, r.get("waitlist_depth") or 0)  # fmt: skip


def event_from_record(name: str, record: dict[str, Any]) -> Event:
    """Core event from a decoded decisions-topic record."""
    r = record
    if name == "IntentAccepted":
        return IntentAccepted(r["intent_id"], r["sale_id"], r["sku"], r["user_id"],
                              r["quantity"], r["order_id"], r["remaining"], r["sequence"],
                              r["decided_at"], r.get("draw_rank", 0),
                              r.get("draw_size", 0), r.get("pay_by", 0))  # fmt: skip
    if name == "IntentRejected":
        return IntentRejected(r["intent_id"], r["sale_id"], r["sku"], r["user_id"],
                              r["quantity"], RejectionReason(r["reason"]), r.get("detail", ""),
                              r["remaining"], r["sequence"], r["decided_at"],
                              r.get("draw_rank", 0), r.get("draw_size", 0))  # fmt: skip
    if name == "SaleOpened":
        return SaleOpened(terms_from_record(r), r["sequence"], r["decided_at"])
    if name == "EntryQueued":
        fields = {f: r[f] for f in EntryQueued.__slots__}
        return EntryQueued(**{**fields, "kind": QueueKind(r["kind"])})
    flat = _FLAT.get(name)
    if flat is None:
        raise ValueError(f"not a decisions-topic record: {name!r}")
    return flat(*(r[f] for f in flat.__slots__))


_FLAT: dict[str, Any] = {
    "SaleRefused": SaleRefused,
    "SaleClosed": SaleClosed,
    "UnitsReturned": UnitsReturned,
    "SaleSettled": SaleSettled,
    "DrawRevealed": DrawRevealed,
    "QueueExpired": QueueExpired,
    "PaymentStarted": PaymentStarted,
    "OrderRefused": OrderRefused,
    "PaymentDeclined": PaymentDeclined,
    "OrderPaid": OrderPaid,
    "PaymentVoided": PaymentVoided,
    "HoldExpired": HoldExpired,
    "HoldCancelled": HoldCancelled,
    "Waitlisted": Waitlisted,
    "SalePaused": SalePaused,
    "SaleResumed": SaleResumed,
    "IntentDeferred": IntentDeferred,
    "UnitsAdded": UnitsAdded,
    "SaleCancelled": SaleCancelled,
    "OrderRefunded": OrderRefunded,
}


def command_from_record(name: str, record: dict[str, Any]) -> Command:
    """Decision-core command from a decoded command-topic record."""
    r = record
    if name == "PurchaseIntent":
        return PlaceIntent(r["intent_id"], r["user_id"], r["sale_id"], r["sku"], r["quantity"])
    if name == "OpenSale":
        return OpenSale(terms_from_record(r))
    if name == "CloseSale":
        return CloseSale(r["sale_id"], r["sku"])
    if name == "SettleSale":
        return SettleSale(r["sale_id"], r["sku"])
    if name == "ReturnUnits":
        return ReturnUnits(r["sale_id"], r["sku"], r["quantity"], r["ref"])
    if name == "RevealDraw":
        return RevealDraw(r["sale_id"], r["sku"], r["seed"])
    if name == "StartPayment":
        return StartPayment(r["sale_id"], r["sku"], r["order_id"], r["user_id"], r["attempt_id"])
    if name == "RecordPayment":
        return RecordPayment(r["sale_id"], r["sku"], r["order_id"], r["attempt_id"],
                             r["succeeded"])  # fmt: skip
    if name == "CancelHold":
        return CancelHold(r["sale_id"], r["sku"], r["order_id"], r["user_id"])
    if name == "PauseSale":
        return PauseSale(r["sale_id"], r["sku"])
    if name == "ResumeSale":
        return ResumeSale(r["sale_id"], r["sku"])
    if name == "AddUnits":
        return AddUnits(r["sale_id"], r["sku"], r["quantity"], r["ref"])
    if name == "CancelSale":
        return CancelSale(r["sale_id"], r["sku"], r["reason"])
    if name == TICK:
        return Tick("")  # the writer gives it each ledger's SKU
    raise ValueError(f"not a command record: {name!r}")
