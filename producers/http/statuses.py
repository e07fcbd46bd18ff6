"""What a shopper is told: an intent's status and an order's, from the facts of the log.

The same JSON answers ``GET /v1/intents/{id}`` and goes on the user's stream
(``/v1/me/events``: ``event: intent``, and ``event: order`` for an order's transitions).
"""

from __future__ import annotations

from typing import Any

from producers.http.waiting import WAITING
from projections.rows import utc

ORDER_FACTS = frozenset({"PaymentStarted", "PaymentDeclined", "OrderPaid", "PaymentVoided",
                         "OrderRefused", "HoldExpired", "HoldCancelled",
                         "OrderRefunded"})  # fmt: skip
"""Facts about an order, pushed to its owner."""
_ORDER_STATUS = {
    "PaymentStarted": "paying",  # the provider is charging it
    "PaymentDeclined": "declined",  # the hold goes on until its deadline: pay again
    "OrderPaid": "paid",
    "PaymentVoided": "payment_voided",  # charged too late or for a released hold: refunded
    "OrderRefused": "refused",  # a pay or cancel request the writer refused (see detail)
    "HoldExpired": "expired",
    "HoldCancelled": "cancelled",
    "OrderRefunded": "refunded",  # the sale was cancelled after it was paid
}


def order_status_of_fact(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """An order's status after one of its facts (``ORDER_FACTS``)."""
    detail = r.get("detail") or None
    if name == "OrderRefused":
        detail = f"{r['command']}: {r['detail']}"
    return {
        "order_id": r["order_id"],
        "sale_id": r["sale_id"],
        "sku": r["sku"],
        "status": _ORDER_STATUS[name],
        "attempt_id": r.get("attempt_id") or r.get("ref") or None,
        "pay_by": utc(r["pay_by"]) if r.get("pay_by") else None,
        "detail": detail,
        "at": utc(r["decided_at"]),
    }


def status_of_fact(fact: Any) -> dict[str, Any]:
    """The public status of an intent from its fact, as ``GET /v1/intents/{id}`` answers it:
    decided (with its rank k of n when it was drawn), or queued in a pre-queue (its place
    among the queued intents and the pre-queue's size when it was queued)."""
    r = fact.record
    if fact.name == WAITING:  # pushed while it waits for the writer (producers.http.waiting)
        return dict(r)
    common = {"intent_id": r["intent_id"], "sale_id": r["sale_id"], "sku": r["sku"],
              "quantity": r["quantity"]}  # fmt: skip
    if fact.name == "Waitlisted":  # waits for a held unit to come back
        ranked = {"draw_rank": r["draw_rank"], "draw_size": r["draw_size"]} if r.get(
            "draw_rank") else {}  # fmt: skip
        return {**common, "status": "waitlisted", "position": r["position"], **ranked}
    if fact.name == "IntentDeferred":  # waits for the operator to resume the sale
        return {**common, "status": "paused", "position": r["position"]}
    if fact.name == "EntryQueued":
        return {**common, "status": "queued", "position": r["queued"],
                "entrants": r["entrants"], "queue_kind": r["kind"].lower()}  # fmt: skip
    accepted = fact.name == "IntentAccepted"
    drawn = bool(r.get("draw_rank"))
    return {
        **common,
        "status": "accepted" if accepted else "rejected",
        "position": None,
        "order_id": r["order_id"] if accepted else None,
        "reason": None if accepted else r["reason"],
        "detail": None if accepted else (r.get("detail") or None),
        "decided_at": utc(r["decided_at"]),
        "draw_rank": r["draw_rank"] if drawn else None,
        "draw_size": r["draw_size"] if drawn else None,
    }
