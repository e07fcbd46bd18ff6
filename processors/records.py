"""Mapping between decision-core types and Avro record dicts (envelope excluded).

The shell adds the envelope (event_id, correlation_id, producer, occurred_at) itself.
Timestamps are epoch milliseconds on both sides.
"""

from __future__ import annotations

from typing import Any

from processors.decision import (
    CloseSale,
    Command,
    Decision,
    IntentAccepted,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    RejectionReason,
    SaleTerms,
    SettleSale,
)

ENVELOPE_FIELDS = ("event_id", "correlation_id", "producer", "occurred_at")


def record_name(event: Decision) -> str:
    """Avro record name of a decision event."""
    return type(event).__name__


def to_record(event: Decision) -> dict[str, Any]:
    """Avro body fields of a decision event (no envelope)."""
    record: dict[str, Any] = {
        "intent_id": event.intent_id,
        "sale_id": event.sale_id,
        "sku": event.sku,
        "user_id": event.user_id,
        "quantity": event.quantity,
    }
    if isinstance(event, IntentAccepted):
        record["order_id"] = event.order_id
    else:
        record["reason"] = event.reason.value
        record["detail"] = event.detail
    record["remaining"] = event.remaining
    record["sequence"] = event.sequence
    record["decided_at"] = event.decided_at
    return record


def from_record(name: str, record: dict[str, Any]) -> Decision:
    """Decision event from a decoded Avro record (extra keys such as the envelope ignored)."""
    r = record
    if name == "IntentAccepted":
        return IntentAccepted(
            r["intent_id"],
            r["sale_id"],
            r["sku"],
            r["user_id"],
            r["quantity"],
            r["order_id"],
            r["remaining"],
            r["sequence"],
            r["decided_at"],
        )
    if name == "IntentRejected":
        return IntentRejected(
            r["intent_id"],
            r["sale_id"],
            r["sku"],
            r["user_id"],
            r["quantity"],
            RejectionReason(r["reason"]),
            r.get("detail", ""),
            r["remaining"],
            r["sequence"],
            r["decided_at"],
        )
    raise ValueError(f"not a decision record: {name!r}")


def terms_from_record(record: dict[str, Any]) -> SaleTerms:
    """Sale terms from a SaleOpened record."""
    r = record
    return SaleTerms(
        r["sale_id"],
        r["sku"],
        r["allocation"],
        r["per_user_limit"],
        r["per_order_max"],
        r["starts_at"],
        r["ends_at"],
    )


def command_from_record(name: str, record: dict[str, Any]) -> Command:
    """Decision-core command from a decoded input-topic record."""
    r = record
    if name == "PurchaseIntent":
        return PlaceIntent(r["intent_id"], r["user_id"], r["sale_id"], r["sku"], r["quantity"])
    if name == "SaleOpened":
        return OpenSale(terms_from_record(r))
    if name == "SaleClosed":
        return CloseSale(r["sale_id"], r["sku"])
    if name == "SaleSettled":
        return SettleSale(r["sale_id"], r["sku"])
    raise ValueError(f"not an input command record: {name!r}")
