"""Intent rules, versioned: a sale names its version in its terms (``SaleTerms.rules``) and
every intent of it is judged by ``RULES[version]``, so replaying or auditing an old sale
applies the rules it was decided under even after the current ones change. A rule version is
a pure function ``(book, command, log_time) -> (reason, detail) | None``; add a version, never
edit one.
"""

from __future__ import annotations

from collections.abc import Callable

from processors.core.model import PlaceIntent, RejectionReason, SaleBook

Fault = tuple[RejectionReason, str] | None
Rules = Callable[[SaleBook, PlaceIntent, int], Fault]


def rules_v1(book: SaleBook, cmd: PlaceIntent, now: int) -> Fault:
    """Quantity, order max, window, closure, stock, per-user limit, in this order."""
    terms = book.terms
    q = cmd.quantity
    if q <= 0:
        return RejectionReason.INVALID_QUANTITY, f"quantity {q} must be >= 1"
    if q > terms.per_order_max:
        return RejectionReason.ORDER_MAX_EXCEEDED, f"quantity {q} > {terms.per_order_max}"
    if now < terms.starts_at_ms:
        return RejectionReason.SALE_NOT_OPEN, f"sale opens at {terms.starts_at_ms}"
    if book.closed or now >= terms.ends_at_ms:
        return RejectionReason.SALE_ENDED, "sale closed" if book.closed else "sale ended"
    if book.remaining == 0:
        return RejectionReason.SOLD_OUT, "no units left"
    had = book.bought.get(cmd.user_id, 0)
    if had + q > terms.per_user_limit:
        return RejectionReason.USER_LIMIT, f"{had} + {q} > limit {terms.per_user_limit}"
    if q > book.remaining:
        return RejectionReason.INSUFFICIENT_STOCK, f"{q} > {book.remaining} left"
    return None


RULES: dict[int, Rules] = {1: rules_v1}
"""Every rules version a sale may be decided under."""
