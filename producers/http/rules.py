"""What the edge may decide by itself: only rejections that are certain.

Everything else (sale not open yet by the writer's clock, per-user limits, stock that is
low but not gone) is the single writer's call, judged on the log's own timestamps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime


class Refused(Exception):
    """A domain rule refuses the request: ``code`` names the rule, ``message`` explains it.

    The HTTP layer maps codes to statuses (``producers.http.errors.REFUSAL_STATUS``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SkuTerms:
    """One SKU of a sale from the projections (``sales`` + ``sale_counters``)."""

    sale_id: str
    sku: str
    allocation: int
    per_user_limit: int
    per_order_max: int
    starts_at: datetime
    ends_at: datetime
    closed: bool
    remaining: int
    holds: bool = False  # orders are held for payment: a held unit may come back
    paused: bool = False  # by the operator: intents wait for the resume
    added: int = 0  # units the operator added to the allocation


def hopeless(sale_state: SkuTerms) -> bool:
    """No unit can come back: remaining 0 in a sale without holds. With holds an expired or
    cancelled hold returns its unit (to the waitlist, or to whoever asks next), so the edge
    leaves the verdict to the writer."""
    return sale_state.remaining <= 0 and not sale_state.holds


def state_of(terms: SkuTerms, now: datetime) -> str:
    """Public state of a SKU: open, not_open, paused, ended or sold_out."""
    if terms.closed or now >= terms.ends_at:
        return "ended"
    if terms.paused:
        return "paused"
    if hopeless(terms):
        return "sold_out"
    if now < terms.starts_at:
        return "not_open"
    return "open"


def check_intent(
    sale_id: str, skus: Mapping[str, SkuTerms] | None, sku: str, quantity: int, now: datetime
) -> SkuTerms:
    """The SKU's terms when the intent may go to the writer; Refused when it is surely lost."""
    if not skus:
        raise Refused("unknown_sale", f"sale {sale_id!r} does not exist")
    terms = skus.get(sku)
    if terms is None:
        raise Refused("unknown_sku", f"sale {sale_id!r} has no SKU {sku!r}")
    if quantity > terms.per_order_max:
        raise Refused(
            "order_max_exceeded",
            f"quantity {quantity} is above this SKU's per-order maximum of {terms.per_order_max}",
        )
    if terms.closed:
        raise Refused("sale_closed", f"sale {sale_id!r} is closed for {sku!r}")
    if now >= terms.ends_at:
        raise Refused("sale_ended", f"sale {sale_id!r} ended at {terms.ends_at.isoformat()}")
    if hopeless(terms):
        raise Refused("sold_out", f"{sku!r} is sold out in sale {sale_id!r}")
    return terms
