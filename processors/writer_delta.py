"""What one batch of the writer changed, written to its store as a delta."""

from __future__ import annotations

from typing import Any

from processors import state_layout as layout
from processors.core import (
    Decision,
    EntryQueued,
    Event,
    IntentAccepted,
    IntentDeferred,
    OrderRefunded,
    OrderRefused,
    SaleResumed,
    SkuLedger,
    UnitsAdded,
    UnitsReturned,
)
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
    | HoldCancelled | OrderRefunded
)  # fmt: skip

LIFECYCLE_EVENTS = frozenset({PaymentStarted, OrderRefused, PaymentDeclined, OrderPaid,
                              PaymentVoided, HoldExpired, HoldCancelled,
                              OrderRefunded})  # fmt: skip


class BookChange:
    """What a batch changed in one book: is it new, intent ids decided, users whose bought
    count changed, return or add refs spent, intents queued (intent id, user id, quantity,
    kind), orders and payment attempts whose state changed, intents deferred by a pause
    (intent id, user id, quantity) since ``undeferred`` (a pause ended: the line is empty)."""

    __slots__ = ("attempts", "deferred", "ids", "new", "orders", "queued", "refs",
                 "undeferred", "users")  # fmt: skip

    def __init__(self, new: bool) -> None:
        self.new = new
        self.ids: list[str] = []
        self.users: set[str] = set()
        self.refs: list[str] = []
        self.queued: list[tuple[str, str, int, str]] = []
        self.orders: list[str] = []
        self.attempts: list[str] = []
        self.deferred: list[tuple[str, str, int]] = []
        self.undeferred = False


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
            entry = self.books[sku, sale_id] = BookChange(new)
        elif new:
            entry.new = True
        return entry

    def decided(self, sku: str, event: Decision, in_book: bool) -> None:
        if not in_book:
            self.skus.add(sku)
            self.orphans.setdefault(sku, []).append(event.intent_id)
            self.orphan_sales.setdefault(sku, set()).add(event.sale_id)
            return
        change = self.book(sku, event.sale_id)
        change.ids.append(event.intent_id)
        if type(event) is IntentAccepted:
            change.users.add(event.user_id)
            if event.pay_by:  # its order is held
                change.orders.append(event.order_id)

    def fact(self, change: BookChange, event: Event) -> None:
        """A book's fact other than a decision or an opening changed what ``change`` says."""
        kind = type(event)
        if kind is UnitsReturned or kind is UnitsAdded:
            change.refs.append(event.ref)  # type: ignore[union-attr]
        elif kind is EntryQueued:
            change.queued.append((event.intent_id, event.user_id, event.quantity,  # type: ignore[union-attr]
                                  event.kind.value))  # type: ignore[union-attr]  # fmt: skip
        elif kind is IntentDeferred:
            change.deferred.append((event.intent_id, event.user_id, event.quantity))  # type: ignore[union-attr]
        elif kind is SaleResumed:
            change.deferred, change.undeferred = [], True
        elif kind in LIFECYCLE_EVENTS:
            self.lifecycle(change, event)  # type: ignore[arg-type]

    def lifecycle(self, change: BookChange, event: OrderEvent) -> None:
        """An order's state or a payment attempt's changed (a refusal or a voided payment
        changes no order: the order may not even exist)."""
        if type(event) is not OrderRefused and type(event) is not PaymentVoided:
            change.orders.append(event.order_id)
        attempt = event.ref if type(event) is OrderRefused else getattr(event, "attempt_id", "")
        if attempt:
            change.attempts.append(attempt)

    def ops(self, ledgers: dict[str, SkuLedger]) -> list[list[Any]]:
        ops: list[list[Any]] = [
            layout.seq_op(sku, {s: ledgers[sku].orphan_sequences[s] for s in sales})
            for sku, sales in self.orphan_sales.items()
        ]
        ops += [[layout.ORPHANS, sku, ids] for sku, ids in self.orphans.items()]
        for (sku, sale_id), c in self.books.items():
            book = ledgers[sku].sales[sale_id]
            ops += layout.book_ops(sku, sale_id, book, terms=c.new, ids=c.ids, users=c.users,
                                   returns=c.refs, queued=c.queued, orders=c.orders,
                                   attempts=c.attempts, deferred=c.deferred,
                                   undeferred=c.undeferred)  # fmt: skip
        return ops
