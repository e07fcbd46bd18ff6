"""The pure decision core: one SKU's ledger, commands in, decision events out.

The single writer of a SKU feeds every command from its SKU-keyed input partition, in log
order, to ``decide``. Time is the broker's log-append time of the command, never a clock.
``decide`` mutates the ledger in place (the ledger is the writer's private state and copying
it per intent would dominate the hot path) and returns the events to emit.

An intent id decided once is remembered (as a member of a set, not its decision): a repeat
of it, whether a client retry or a producer retry, yields no event at all, so the committed
decision log holds exactly one decision per intent id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container
from dataclasses import dataclass, field
from enum import StrEnum


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


@dataclass(slots=True, frozen=True)
class SaleTerms:
    """Terms of one sale for one SKU; the window is [starts_at_ms, ends_at_ms)."""

    sale_id: str
    sku: str
    allocation: int
    per_user_limit: int
    per_order_max: int
    starts_at_ms: int
    ends_at_ms: int


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


Command = OpenSale | CloseSale | PlaceIntent | ReturnUnits | SettleSale

# -- events -----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class IntentAccepted:
    """An intent won ``quantity`` units; it becomes order ``order_id``."""

    intent_id: str
    sale_id: str
    sku: str
    user_id: str
    quantity: int
    order_id: str
    remaining: int
    sequence: int
    decided_at: int


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


@dataclass(slots=True, frozen=True)
class UnitsReturned:
    """Units came back to a sale; ``quantity`` is what was actually applied."""

    sale_id: str
    sku: str
    ref: str
    quantity: int
    remaining: int
    sequence: int
    decided_at: int


@dataclass(slots=True, frozen=True)
class SaleRejected:
    """An OpenSale was ignored (invalid terms, or conflicting with terms already open)."""

    sale_id: str
    sku: str
    detail: str


@dataclass(slots=True, frozen=True)
class SaleSettled:
    """A closed sale was settled: ``forgotten`` intents' decisions may be deleted from storage.

    ``digests`` (sorted 8-byte digests of every decided intent id), ``sequence`` and
    ``remaining`` are what the writer keeps of the sale from now on.
    """

    sale_id: str
    sku: str
    forgotten: tuple[str, ...]
    digests: frozenset[int]
    sequence: int
    remaining: int


Decision = IntentAccepted | IntentRejected
Sequenced = IntentAccepted | IntentRejected | UnitsReturned
Event = IntentAccepted | IntentRejected | UnitsReturned | SaleRejected | SaleSettled

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


@dataclass(slots=True)
class SkuLedger:
    """Everything the single writer of one SKU knows."""

    sku: str
    sales: dict[str, SaleBook] = field(default_factory=dict)
    # Intent ids rejected as UNKNOWN_SALE: they belong to no SaleBook.
    orphans: set[str] = field(default_factory=set)
    # Sequence per unknown sale id: its UNKNOWN_SALE rejections are numbered like any
    # (sale, SKU)'s events, and a book opened later under that id continues the count.
    orphan_sequences: dict[str, int] = field(default_factory=dict)


class WrongLedger(ValueError):
    """A command for another SKU reached this ledger (a routing bug, not bad input)."""


def terms_problem(terms: SaleTerms) -> str | None:
    """Why ``terms`` are invalid, or None if they are valid."""
    if terms.allocation < 0:
        return "allocation must be >= 0"
    if terms.per_user_limit < 1 or terms.per_order_max < 1:
        return "per_user_limit and per_order_max must be >= 1"
    if terms.starts_at_ms >= terms.ends_at_ms:
        return "starts_at must be before ends_at"
    return None


def _known(ledger: SkuLedger, book: SaleBook | None, intent_id: str) -> bool:
    if intent_id in ledger.orphans or (book is not None and intent_id in book.decided):
        return True
    # Intent ids embed the sale, so only a forged or corrupted record reaches this loop with
    # a known id; treating it as a repeat keeps "one decision per intent id".
    return any(intent_id in other.decided for other in ledger.sales.values())


def _rule_fault(book: SaleBook, cmd: PlaceIntent, now: int) -> tuple[RejectionReason, str] | None:
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


def intent_digest(intent_id: str) -> int:
    """64-bit digest of an intent id, kept for settled sales."""
    return int.from_bytes(hashlib.blake2b(intent_id.encode(), digest_size=8).digest(), "big")


def _place(ledger: SkuLedger, cmd: PlaceIntent, now: int) -> list[Event]:
    book = ledger.sales.get(cmd.sale_id)
    if _known(ledger, book, cmd.intent_id):
        return []  # a repeat: its one decision is already in the log
    if book is not None and book.settled and intent_digest(cmd.intent_id) in book.settled_digests:
        return []  # decided before settlement: that decision stands, none is added
    if book is None:
        seq = ledger.orphan_sequences.get(cmd.sale_id, 0) + 1
        ledger.orphan_sequences[cmd.sale_id] = seq
        orphan = IntentRejected(
            cmd.intent_id,
            cmd.sale_id,
            cmd.sku,
            cmd.user_id,
            cmd.quantity,
            RejectionReason.UNKNOWN_SALE,
            "no such sale for this SKU",
            0,
            seq,
            now,
        )
        ledger.orphans.add(cmd.intent_id)
        return [orphan]
    seq = book.sequence = book.sequence + 1
    fault = _rule_fault(book, cmd, now)
    decision: Decision
    if fault is None:
        book.remaining -= cmd.quantity
        book.bought[cmd.user_id] = book.bought.get(cmd.user_id, 0) + cmd.quantity
        decision = IntentAccepted(
            cmd.intent_id,
            cmd.sale_id,
            cmd.sku,
            cmd.user_id,
            cmd.quantity,
            order_id_for(cmd.intent_id),
            book.remaining,
            seq,
            now,
        )
    else:
        decision = IntentRejected(
            cmd.intent_id,
            cmd.sale_id,
            cmd.sku,
            cmd.user_id,
            cmd.quantity,
            fault[0],
            fault[1],
            book.remaining,
            seq,
            now,
        )
    book.decided.add(cmd.intent_id)
    return [decision]


def _return(ledger: SkuLedger, cmd: ReturnUnits, now: int) -> list[Event]:
    book = ledger.sales.get(cmd.sale_id)
    if book is None or cmd.quantity <= 0:
        return []
    if cmd.ref in book.returns:
        return []
    # Units out = allocation - remaining; never give back more than that.
    applied = min(cmd.quantity, book.terms.allocation - book.remaining)
    book.remaining += applied
    book.sequence += 1
    event = UnitsReturned(
        cmd.sale_id, cmd.sku, cmd.ref, applied, book.remaining, book.sequence, now
    )
    book.returns.add(cmd.ref)
    return [event]


def _settle(ledger: SkuLedger, cmd: SettleSale, now: int) -> list[Event]:
    book = ledger.sales.get(cmd.sale_id)
    if book is None or book.settled:
        return []
    if not (book.closed or now >= book.terms.ends_at_ms):
        return [SaleRejected(cmd.sale_id, cmd.sku, "sale still open: close it before settling")]
    forgotten = tuple(book.decided)
    digests = frozenset(map(intent_digest, forgotten))
    book.settled_digests = digests
    book.decided, book.bought, book.closed, book.settled = set(), {}, True, True
    return [SaleSettled(cmd.sale_id, cmd.sku, forgotten, digests, book.sequence, book.remaining)]


def _open(ledger: SkuLedger, cmd: OpenSale) -> list[Event]:
    terms = cmd.terms
    book = ledger.sales.get(terms.sale_id)
    if book is not None:
        if book.terms == terms:
            return []  # replayed OpenSale
        # Changing terms mid-sale is out of scope: the edge refuses it; here it is ignored.
        return [SaleRejected(terms.sale_id, terms.sku, "sale already open with other terms")]
    problem = terms_problem(terms)
    if problem is not None:
        return [SaleRejected(terms.sale_id, terms.sku, problem)]
    sequence = ledger.orphan_sequences.get(terms.sale_id, 0)
    ledger.sales[terms.sale_id] = SaleBook(terms, terms.allocation, sequence=sequence)
    return []


def decide(ledger: SkuLedger, command: Command, log_time_ms: int) -> list[Event]:
    """Apply ``command`` (stamped with broker log time) to ``ledger``; return events to emit.

    PlaceIntent yields exactly one decision for a new intent id; a repeated intent id yields
    nothing and changes nothing (its one decision stands), settled sale or not. OpenSale with
    identical terms is a no-op; with other or invalid terms it changes nothing and yields a
    ``SaleRejected``. CloseSale (idempotent) and unknown-sale CloseSale/ReturnUnits yield
    nothing. SettleSale of a closed or ended sale yields ``SaleSettled`` once.
    """
    if command.sku != ledger.sku:
        raise WrongLedger(f"command for {command.sku!r} sent to ledger of {ledger.sku!r}")
    if type(command) is PlaceIntent:
        return _place(ledger, command, log_time_ms)
    if type(command) is OpenSale:
        return _open(ledger, command)
    if type(command) is CloseSale:
        book = ledger.sales.get(command.sale_id)
        if book is not None:
            book.closed = True
        return []
    if type(command) is ReturnUnits:
        return _return(ledger, command, log_time_ms)
    if type(command) is SettleSale:
        return _settle(ledger, command, log_time_ms)
    raise TypeError(f"not a command: {command!r}")


def order_id_for(intent_id: str) -> str:
    """Deterministic order id of an accepted intent."""
    return "ord-" + intent_id
