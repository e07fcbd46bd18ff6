"""What one batch of the writer changed, written to its store as a delta."""

from __future__ import annotations

from typing import Any

from processors import state_layout as layout
from processors.core import Decision, IntentAccepted, OrderRefused, SkuLedger
from processors.core.lifecycle_model import (
    HoldCancelled,
    HoldExpired,
    OrderPaid,
    PaymentDeclined,
    PaymentStarted,
    PaymentVoided,
)

# The lifecycle facts about one order (a Waitlisted intent has none yet: the book's waitlist
# is written whole with the book, see ``state_layout.book_ops``).
OrderEvent = (
    PaymentStarted | OrderRefused | PaymentDeclined | OrderPaid | PaymentVoided | HoldExpired
    | HoldCancelled
)  # fmt: skip

LIFECYCLE_EVENTS = frozenset({PaymentStarted, OrderRefused, PaymentDeclined, OrderPaid,
                              PaymentVoided, HoldExpired, HoldCancelled})  # fmt: skip

# [is new], new intent ids, users whose bought count changed, new return refs, new queued
# intents (intent id, user id, quantity, kind), orders whose state changed, payment attempts
# whose state changed
BookChange = tuple[
    list[bool], list[str], set[str], list[str], list[tuple[str, str, int, str]], list[str],
    list[str],
]  # fmt: skip


class Touched:
    """What one batch changed, to write as a delta."""

    __slots__ = ("books", "orphan_sales", "orphans", "settled", "skus")

    def __init__(self) -> None:
        self.skus: set[str] = set()
        self.orphans: dict[str, list[str]] = {}
        self.orphan_sales: dict[str, set[str]] = {}  # sku -> unknown sale ids numbered
        self.books: dict[tuple[str, str], BookChange] = {}
        self.settled = False

    def book(self, sku: str, sale_id: str, new: bool = False) -> BookChange:
        self.skus.add(sku)
        entry = self.books.get((sku, sale_id))
        if entry is None:
            entry = self.books[sku, sale_id] = ([new], [], set(), [], [], [], [])
        elif new:
            entry[0][0] = True
        return entry

    def decided(self, sku: str, event: Decision, in_book: bool) -> None:
        if not in_book:
            self.skus.add(sku)
            self.orphans.setdefault(sku, []).append(event.intent_id)
            self.orphan_sales.setdefault(sku, set()).add(event.sale_id)
            return
        change = self.book(sku, event.sale_id)
        change[1].append(event.intent_id)
        if type(event) is IntentAccepted:
            change[2].add(event.user_id)
            if event.pay_by:  # its order is held
                change[5].append(event.order_id)

    def lifecycle(self, change: BookChange, event: OrderEvent) -> None:
        """An order's state or a payment attempt's changed (a refusal or a voided payment
        changes no order: the order may not even exist)."""
        if type(event) is not OrderRefused and type(event) is not PaymentVoided:
            change[5].append(event.order_id)
        attempt = event.ref if type(event) is OrderRefused else getattr(event, "attempt_id", "")
        if attempt:
            change[6].append(attempt)

    def ops(self, ledgers: dict[str, SkuLedger]) -> list[list[Any]]:
        ops: list[list[Any]] = [
            layout.seq_op(sku, {s: ledgers[sku].orphan_sequences[s] for s in sales})
            for sku, sales in self.orphan_sales.items()
        ]
        ops += [[layout.ORPHANS, sku, ids] for sku, ids in self.orphans.items()]
        for (sku, sale_id), (new, ids, users, refs, queued, orders, tries) in self.books.items():
            book = ledgers[sku].sales[sale_id]
            ops += layout.book_ops(sku, sale_id, book, terms=new[0], ids=ids, users=users,
                                   returns=refs, queued=queued, orders=orders,
                                   attempts=tries)  # fmt: skip
        return ops
