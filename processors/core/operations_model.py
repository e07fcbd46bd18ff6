"""The operator's controls over a running sale (``processors.core.operations``).

An operator pauses a sale (arriving intents wait, in order, none lost), resumes it (they are
decided then, in arrival order, by the sale's rules), adds units to its allocation, or
cancels it (holds released, paid orders refunded, everyone still waiting told at once).
Each is a command on the SKU command topic, decided by the sale's one writer like any other,
and each outcome is a numbered fact of the (sale, SKU).
"""

from __future__ import annotations

from dataclasses import dataclass

# -- commands ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PauseSale:
    """Stop deciding intents of a sale: they wait (``IntentDeferred``) until it resumes."""

    sale_id: str
    sku: str


@dataclass(slots=True, frozen=True)
class ResumeSale:
    """Decide the intents that waited, in arrival order, and every later one as it comes."""

    sale_id: str
    sku: str


@dataclass(slots=True, frozen=True)
class AddUnits:
    """Add ``quantity`` units to a sale's allocation; ``ref`` makes it idempotent (refs are
    shared with ``ReturnUnits``: one ref, one change)."""

    sale_id: str
    sku: str
    quantity: int
    ref: str


@dataclass(slots=True, frozen=True)
class CancelSale:
    """Call a sale off for good, for ``reason``."""

    sale_id: str
    sku: str
    reason: str


# -- events -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SalePaused:
    """Intents of the sale wait from here on; holds, payments and expiry go on."""

    sale_id: str
    sku: str
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class SaleResumed:
    """The pause is over (the operator resumed, or the sale closed, ended or was cancelled):
    the ``waiting`` intents deferred by it are decided by the events that follow, in the
    order they arrived, by the sale's rules at this log time."""

    sale_id: str
    sku: str
    waiting: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class IntentDeferred:
    """An intent arrived while its sale was paused: it waits, ``position`` in line (not a
    decision: its one decision follows the ``SaleResumed`` that ends the pause)."""

    intent_id: str
    sale_id: str
    sku: str
    user_id: str
    quantity: int
    position: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class UnitsAdded:
    """The operator added ``quantity`` units: the sale now has ``allocation`` in all."""

    sale_id: str
    sku: str
    ref: str
    quantity: int
    allocation: int
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class SaleCancelled:
    """The sale is called off (and closed): the facts that follow release every hold, refund
    every paid order and decide everyone still waiting."""

    sale_id: str
    sku: str
    reason: str
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class OrderRefunded:
    """A paid order of a cancelled sale: the payment service refunds ``attempt_id``."""

    sale_id: str
    sku: str
    order_id: str
    attempt_id: str
    user_id: str
    quantity: int
    remaining: int
    sequence: int
    decided_at: int


OperatorCommand = PauseSale | ResumeSale | AddUnits | CancelSale
OperatorEvent = (
    SalePaused | SaleResumed | IntentDeferred | UnitsAdded | SaleCancelled | OrderRefunded
)  # fmt: skip
