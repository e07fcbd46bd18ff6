"""The decision core's vocabulary: sale terms, commands, fact events and the writer's state.

Commands are imperative (``OpenSale``, ``PlaceIntent``) and arrive on the SKU command topic;
events are past-tense facts (``SaleOpened``, ``IntentAccepted``) and go to the decisions
topic. No record type is both. Every event carries the gap-free ``sequence`` of its
(sale, SKU) and the broker log time of the command that caused it (``decided_at``).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from enum import StrEnum

from processors.core.lifecycle_model import Hold, LifecycleCommand, LifecycleEvent
from processors.core.operations_model import OperatorCommand, OperatorEvent

CURRENT_RULES = 1
"""The rules version a sale opens under unless its OpenSale names another."""


class RejectionReason(StrEnum):
    """Why an intent was rejected (same symbols as the Avro enum)."""

    UNKNOWN_SALE = "UNKNOWN_SALE"
    INVALID_QUANTITY = "INVALID_QUANTITY"
    ORDER_MAX_EXCEEDED = "ORDER_MAX_EXCEEDED"
    SALE_NOT_OPEN = "SALE_NOT_OPEN"
    SALE_ENDED = "SALE_ENDED"
    SOLD_OUT = "SOLD_OUT"
    INSUFFICIENT_STOCK = "INSUFFICIENT_STOCK"
    USER_LIMIT = "USER_LIMIT"
    UNSPECIFIED = "UNSPECIFIED"
    ALREADY_QUEUED = "ALREADY_QUEUED"  # another intent of an entrant, in the pre-queue window
    DRAW_NOT_REVEALED = "DRAW_NOT_REVEALED"  # queued, and the sale ended without a reveal


class QueueKind(StrEnum):
    """What a queued intent is: a person's one entry in the draw, another intent of theirs
    in the window (rejected ``ALREADY_QUEUED`` at the draw), or an intent that arrived after
    the start but before the reveal (decided in log order behind the drawn entries)."""

    ENTRY = "ENTRY"
    REPEAT = "REPEAT"
    LATE = "LATE"


@dataclass(slots=True, frozen=True)
class SaleTerms:
    """Terms of one sale for one SKU; the window is [starts_at_ms, ends_at_ms).

    ``rules`` is the version of the intent rules the sale is decided under, kept with the
    terms so a later rule change never rewrites how an earlier sale is judged or replayed.
    """

    sale_id: str
    sku: str
    allocation: int
    per_user_limit: int
    per_order_max: int
    starts_at_ms: int
    ends_at_ms: int
    rules: int = CURRENT_RULES
    # The pre-queue: intents in [prequeue_opens_at_ms, starts_at_ms) are queued and drawn
    # once a seed matching ``draw_commitment`` (hex SHA-256 of the seed) is revealed.
    prequeue_opens_at_ms: int | None = None
    draw_commitment: str | None = None
    # Every this many sequence numbers (and when the allocation runs out) the writer says how
    # far through its input log it is: ``QueueProgress`` (None: never, as in older sales).
    progress_every: int | None = None
    # Holds: an accepted intent's order is held for this long (ms of log time) for its owner
    # to pay (None: accepted is final, as in sales opened before holds); a payment started in
    # time may still succeed up to ``pay_grace_ms`` after the deadline.
    hold_ms: int | None = None
    pay_grace_ms: int = 0
    # With holds: up to this many intents that find no unit while units may still come back
    # wait (``Waitlisted``) instead of being rejected, served in order as units return.
    waitlist_depth: int = 0


# -- commands ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class OpenSale:
    """Open a sale for one SKU."""

    terms: SaleTerms

    @property
    def sku(self) -> str:
        """SKU the sale is for."""
        return self.terms.sku


@dataclass(slots=True, frozen=True)
class CloseSale:
    """Close a sale for one SKU before its end."""

    sale_id: str
    sku: str


@dataclass(slots=True, frozen=True)
class PlaceIntent:
    """Ask for ``quantity`` units of ``sku`` in ``sale_id`` on behalf of ``user_id``."""

    intent_id: str
    user_id: str
    sale_id: str
    sku: str
    quantity: int


@dataclass(slots=True, frozen=True)
class ReturnUnits:
    """Give units back to a sale (e.g. an expired hold); ``ref`` makes it idempotent."""

    sale_id: str
    sku: str
    quantity: int
    ref: str


@dataclass(slots=True, frozen=True)
class SettleSale:
    """Forget a closed sale's per-intent state, keeping a digest of each decided intent id."""

    sale_id: str
    sku: str


@dataclass(slots=True, frozen=True)
class RevealDraw:
    """Reveal the seed of a pre-queue sale's draw (the sale clock writes it at the start)."""

    sale_id: str
    sku: str
    seed: str


@dataclass(slots=True, frozen=True)
class Tick:
    """The sale clock's tick, handed to every ledger of the partition it was written to: log
    time moves on even when no intent arrives (a pre-queue that outlives its sale expires)."""

    sku: str


Command = (
    OpenSale | CloseSale | PlaceIntent | ReturnUnits | SettleSale | RevealDraw | Tick
    | LifecycleCommand | OperatorCommand
)  # fmt: skip

# -- events -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class SaleOpened:
    """A sale of one SKU opened with ``terms`` (its rules version included)."""

    terms: SaleTerms
    sequence: int
    decided_at: int

    @property
    def sale_id(self) -> str:
        """Sale the event belongs to."""
        return self.terms.sale_id

    @property
    def sku(self) -> str:
        """SKU the event belongs to."""
        return self.terms.sku


@dataclass(slots=True, frozen=True)
class SaleRefused:
    """A sale command (``command``: OpenSale or SettleSale) was refused and changed nothing."""

    sale_id: str
    sku: str
    command: str
    detail: str
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class SaleClosed:
    """A sale of one SKU was closed before its end; no intent is accepted after it."""

    sale_id: str
    sku: str
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class UnitsReturned:
    """Units came back to a sale; ``quantity`` is what was applied of ``requested``."""

    sale_id: str
    sku: str
    ref: str
    requested: int
    quantity: int
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class SaleSettled:
    """A closed sale was settled: its ``intents`` decided intent ids are kept as digests only."""

    sale_id: str
    sku: str
    intents: int
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class EntryQueued:
    """An intent of a pre-queue sale is queued, not decided yet (``kind``: see QueueKind).
    ``entrants`` counts the entries so far (the pre-queue's size), ``queued`` every queued
    intent so far (this one's place in the queue)."""

    intent_id: str
    sale_id: str
    sku: str
    user_id: str
    quantity: int
    kind: QueueKind
    entrants: int
    queued: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class DrawRevealed:
    """The seed was revealed and matched the commitment: the queued entries are decided in
    the draw's order (``processors.core.prequeue.draw_order``), followed by the events that
    decide them; ``entries_digest`` names the final entry set the order was drawn over."""

    sale_id: str
    sku: str
    seed: str
    entrants: int
    entries_digest: str
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class QueueExpired:
    """The sale ended (or was closed) with its pre-queue undrawn: every queued intent is
    rejected ``DRAW_NOT_REVEALED`` by the events that follow."""

    sale_id: str
    sku: str
    entrants: int
    queued: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class IntentAccepted:
    """An intent won ``quantity`` units; it becomes order ``order_id``. ``draw_rank`` is its
    rank k of ``draw_size`` in a pre-queue draw (0 of 0 when it was not drawn)."""

    intent_id: str
    sale_id: str
    sku: str
    user_id: str
    quantity: int
    order_id: str
    remaining: int
    sequence: int
    decided_at: int
    draw_rank: int = 0
    draw_size: int = 0
    pay_by: int = 0  # in a sale with holds: the order is held until then (log time), else 0


@dataclass(slots=True, frozen=True)
class IntentRejected:
    """An intent was refused for ``reason``."""

    intent_id: str
    sale_id: str
    sku: str
    user_id: str
    quantity: int
    reason: RejectionReason
    detail: str
    remaining: int
    sequence: int
    decided_at: int
    draw_rank: int = 0
    draw_size: int = 0


@dataclass(slots=True, frozen=True)
class QueueProgress:
    """How far the writer of ``sku`` is through its input partition, after the event
    ``after_sequence`` of (sale, SKU): every intent of the partition at an offset above
    ``input_offset`` is still waiting; ``sold_out`` when that event took the last unit.

    Not one of the sale's numbered events (it changes no state, it has no ``sequence`` of its
    own): the writer adds it after each event ``processors.core.progress.progress_due`` names,
    with the offset and log time of the command that caused the event, so a replay of the
    same log writes the same facts."""

    sale_id: str
    sku: str
    after_sequence: int
    remaining: int
    sold_out: bool
    input_partition: int
    input_offset: int
    decided_at: int


Decision = IntentAccepted | IntentRejected
"""The final accept or reject of an intent: exactly one per intent id."""
Event = (
    SaleOpened | SaleRefused | SaleClosed | UnitsReturned | SaleSettled | EntryQueued
    | DrawRevealed | QueueExpired | Decision | LifecycleEvent | OperatorEvent
)  # fmt: skip

# -- state ------------------------------------------------------------------------------


@dataclass(slots=True)
class SaleBook:
    """State of one sale of the ledger's SKU."""

    terms: SaleTerms
    remaining: int
    closed: bool = False
    # Events of this (sale, SKU) so far: each event carries the next number, gap-free from 1.
    sequence: int = 0
    bought: dict[str, int] = field(default_factory=dict)
    decided: set[str] = field(default_factory=set)
    returns: set[str] = field(default_factory=set)
    # After settlement only digests of decided intent ids remain, kept by the writer on disk
    # (``settled_digests`` answers ``in`` from there): enough to recognise a repeat.
    settled: bool = False
    settled_digests: Container[int] = frozenset()
    # The pre-queue, until it is drawn or expires (``queue_done``): queued intents in log
    # order as (intent id, user id, quantity, kind), their ids, and the users with an entry.
    queue: list[tuple[str, str, int, str]] = field(default_factory=list)
    queued_ids: set[str] = field(default_factory=set)
    entrants: set[str] = field(default_factory=set)
    queue_done: bool = False
    # The order lifecycle (a sale with ``terms.hold_ms``): held orders by order id, orders
    # that left their hold ("paid", "expired", "cancelled") and every payment attempt seen
    # ("started", "declined", "paid", "voided", "refused", "refunded"), so each is decided
    # once.
    holds: dict[str, Hold] = field(default_factory=dict)
    orders: dict[str, str] = field(default_factory=dict)
    paid: dict[str, Hold] = field(default_factory=dict)  # paid orders (refunded if cancelled)
    attempts: dict[str, str] = field(default_factory=dict)
    # The waitlist, in order: (intent id, user id, quantity), and its intent ids.
    waitlist: list[tuple[str, str, int]] = field(default_factory=list)
    waitlisted_ids: set[str] = field(default_factory=set)
    # The operator's controls (``processors.core.operations``): paused, with the intents
    # that arrived meanwhile in order (intent id, user id, quantity) and their ids; units
    # added to the allocation; cancelled (closed for good, orders refunded).
    paused: bool = False
    deferred: list[tuple[str, str, int]] = field(default_factory=list)
    deferred_ids: set[str] = field(default_factory=set)
    added: int = 0
    cancelled: bool = False

    @property
    def queueing(self) -> bool:
        """Whether intents of this sale are still queued rather than decided."""
        return self.terms.prequeue_opens_at_ms is not None and not self.queue_done


@dataclass(slots=True)
class SkuLedger:
    """Everything the single writer of one SKU knows."""

    sku: str
    sales: dict[str, SaleBook] = field(default_factory=dict)
    # Intent ids rejected as UNKNOWN_SALE: they belong to no SaleBook.
    orphans: set[str] = field(default_factory=set)
    # Sequence per sale id without a book (its UNKNOWN_SALE rejections and refused opens
    # are numbered like any (sale, SKU)'s events; a book opened later continues the count).
    orphan_sequences: dict[str, int] = field(default_factory=dict)

    def next_sequence(self, sale_id: str) -> int:
        """The sequence the next event of (``sale_id``, this SKU) carries."""
        book = self.sales.get(sale_id)
        if book is not None:
            return book.sequence + 1
        return self.orphan_sequences.get(sale_id, 0) + 1


class WrongLedger(ValueError):
    """A command or event for another SKU reached this ledger (a routing bug, not bad input)."""


def order_id_for(intent_id: str) -> str:
    """Deterministic order id of an accepted intent."""
    return "ord-" + intent_id


def intent_of_order(order_id: str) -> str:
    """The intent an order was made for (``order_id_for`` backwards): logs trace by it."""
    return order_id.removeprefix("ord-")
