"""The order lifecycle's vocabulary: holds, payments, expiry (``processors.core.lifecycle``).

In a sale opened with a payment window (``SaleTerms.hold_ms``) an accepted intent is a
*reservation*: its order is held until ``pay_by`` (the accepting command's log time plus the
window). Commands here come from the edge (the owner starts a payment or cancels) and from
the payment service (an attempt's result); every transition is a fact of the same (sale,
SKU), numbered in its one sequence and decided by its one writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Hold(NamedTuple):
    """A held order: whose, how many units, until when (log time, ms), and the payment
    attempt in progress (None: none)."""

    intent_id: str
    user_id: str
    quantity: int
    pay_by: int
    attempt: str | None = None


# -- commands ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class StartPayment:
    """The owner of a held order starts paying it; ``attempt_id`` makes it idempotent."""

    sale_id: str
    sku: str
    order_id: str
    user_id: str
    attempt_id: str


@dataclass(slots=True, frozen=True)
class RecordPayment:
    """The payment service's result of an attempt: the provider charged it or declined it."""

    sale_id: str
    sku: str
    order_id: str
    attempt_id: str
    succeeded: bool


@dataclass(slots=True, frozen=True)
class CancelHold:
    """The owner gives a held order up: its units go back to the sale."""

    sale_id: str
    sku: str
    order_id: str
    user_id: str


# -- events -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PaymentStarted:
    """An attempt to pay a held order began before its deadline: a success recorded by
    ``pay_by`` plus the sale's grace pays it."""

    sale_id: str
    sku: str
    order_id: str
    attempt_id: str
    user_id: str
    pay_by: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class OrderRefused:
    """An order command (``command``: StartPayment or CancelHold) was refused; ``ref`` is
    its attempt id (empty for a cancel). Nothing changed and nothing was charged."""

    sale_id: str
    sku: str
    order_id: str
    command: str
    ref: str
    detail: str
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class PaymentDeclined:
    """The provider declined an attempt: the hold goes on until its deadline."""

    sale_id: str
    sku: str
    order_id: str
    attempt_id: str
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class OrderPaid:
    """A held order is paid: its units are sold for good."""

    sale_id: str
    sku: str
    order_id: str
    attempt_id: str
    user_id: str
    quantity: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class PaymentVoided:
    """The provider charged an attempt that cannot pay the order (after its deadline and
    grace, for a hold that expired or was cancelled, an attempt never started, or an order
    paid already): it never revives a hold; the payment service refunds it."""

    sale_id: str
    sku: str
    order_id: str
    attempt_id: str
    detail: str
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class Waitlisted:
    """An intent found no unit while held units may still come back: it waits, ``position``
    in line (not a decision: its one decision comes when a unit returns to it, or when none
    can come back any more). A pre-queue's draw that waitlists an entry names its rank k of
    n (``draw_rank``/``draw_size``; 0 of 0 otherwise)."""

    intent_id: str
    sale_id: str
    sku: str
    user_id: str
    quantity: int
    position: int
    sequence: int
    decided_at: int
    draw_rank: int = 0
    draw_size: int = 0


@dataclass(slots=True, frozen=True)
class HoldExpired:
    """A hold's deadline passed (by log time) unpaid: its units are back in the sale."""

    sale_id: str
    sku: str
    order_id: str
    user_id: str
    quantity: int
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class HoldCancelled:
    """The owner gave a hold up: its units are back in the sale."""

    sale_id: str
    sku: str
    order_id: str
    user_id: str
    quantity: int
    remaining: int
    sequence: int
    decided_at: int


LifecycleCommand = StartPayment | RecordPayment | CancelHold
LifecycleEvent = (
    PaymentStarted | OrderRefused | PaymentDeclined | OrderPaid | PaymentVoided | HoldExpired
    | HoldCancelled | Waitlisted
)  # fmt: skip
