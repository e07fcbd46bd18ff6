"""The sale-terms rule family: open, close, return units, settle.

Each ``decide_*`` is pure (it reads the ledger, never changes it) and returns the facts;
each ``evolve_*`` applies one fact to the ledger. Every fact takes the next gap-free
sequence number of its (sale, SKU), a refused command too (it is still an answer in the log).
"""

from __future__ import annotations

from processors.core.intents import intent_digest
from processors.core.lifecycle import serve_waitlist
from processors.core.model import (
    CloseSale,
    Event,
    OpenSale,
    ReturnUnits,
    SaleBook,
    SaleClosed,
    SaleOpened,
    SaleRefused,
    SaleSettled,
    SaleTerms,
    SettleSale,
    SkuLedger,
    UnitsReturned,
)
from processors.core.operations import unpause
from processors.core.prequeue import expire, is_sha256_hex
from processors.core.progress import progress_problem
from processors.core.rules import RULES


def terms_problem(terms: SaleTerms) -> str | None:
    """Why ``terms`` are invalid, or None if they are valid."""
    if terms.allocation < 0:
        return "allocation must be >= 0"
    if terms.per_user_limit < 1 or terms.per_order_max < 1:
        return "per_user_limit and per_order_max must be >= 1"
    if terms.starts_at_ms >= terms.ends_at_ms:
        return "starts_at must be before ends_at"
    if terms.rules not in RULES:
        return f"unknown rules version {terms.rules} (known: {sorted(RULES)})"
    opens, committed = terms.prequeue_opens_at_ms, terms.draw_commitment
    if (opens is None) != (committed is None):
        return "a pre-queue needs both prequeue_opens_at and draw_commitment"
    if opens is not None and opens >= terms.starts_at_ms:
        return "prequeue_opens_at must be before starts_at"
    if committed is not None and not is_sha256_hex(committed):
        return "draw_commitment must be 64 lowercase hex characters (SHA-256 of the seed)"
    if terms.hold_ms is not None and not 1_000 <= terms.hold_ms <= 86_400_000:
        return "hold_ms must be between 1000 (1 s) and 86400000 (a day)"
    if not 0 <= terms.pay_grace_ms <= 3_600_000:
        return "pay_grace_ms must be between 0 and 3600000 (an hour)"
    if not 0 <= terms.waitlist_depth <= 10_000:
        return "waitlist_depth must be between 0 and 10000"
    if terms.waitlist_depth and terms.hold_ms is None:
        return "a waitlist needs holds (hold_ms): only a held unit can come back to it"
    return progress_problem(terms.progress_every)


def decide_open(ledger: SkuLedger, cmd: OpenSale, now: int) -> list[Event]:
    """``SaleOpened`` once; a repeat with the same terms is a no-op; other terms are refused."""
    terms = cmd.terms
    book = ledger.sales.get(terms.sale_id)
    seq = ledger.next_sequence(terms.sale_id)
    if book is not None:
        if book.terms == terms:
            return []  # a replayed OpenSale
        # Changing terms mid-sale is out of scope: the edge refuses it; here it is refused.
        return [SaleRefused(terms.sale_id, terms.sku, "OpenSale",
                            "sale already open with other terms", seq, now)]  # fmt: skip
    problem = terms_problem(terms)
    if problem is not None:
        return [SaleRefused(terms.sale_id, terms.sku, "OpenSale", problem, seq, now)]
    return [SaleOpened(terms, seq, now)]


def decide_close(ledger: SkuLedger, cmd: CloseSale, now: int) -> list[Event]:
    """``SaleClosed`` for an open book; closing again, or an unknown sale, yields nothing."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or book.closed:
        return []
    closed = SaleClosed(cmd.sale_id, cmd.sku, book.remaining, book.sequence + 1, now)
    if book.queueing:  # closed before the draw: the queue expires with it
        detail = "the sale was closed before the draw"
        return [closed, *expire(book, cmd.sale_id, cmd.sku, now, detail, closed.sequence + 1)]
    events: list[Event] = [closed]
    if book.waitlist:  # and so does the waitlist
        events += serve_waitlist(book, cmd.sale_id, cmd.sku, now, closed.sequence,
                                 book.remaining, len(book.holds), ended=True)  # fmt: skip
    if book.paused:  # and the pause: what waited is decided (rejected: closed)
        events += unpause(ledger, cmd.sale_id, now, events)
    return events


def decide_return(ledger: SkuLedger, cmd: ReturnUnits, now: int) -> list[Event]:
    """``UnitsReturned`` once per ``ref``, never more than the units that went out."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or book.settled or cmd.quantity <= 0 or cmd.ref in book.returns:
        return []
    # Never more than went out for good: held units come back by their own expiry or cancel.
    held = sum(h.quantity for h in book.holds.values())
    had = book.terms.allocation + book.added
    applied = max(0, min(cmd.quantity, had - book.remaining - held))
    returned = UnitsReturned(cmd.sale_id, cmd.sku, cmd.ref, cmd.quantity, applied,
                             book.remaining + applied, book.sequence + 1, now)  # fmt: skip
    if not book.waitlist:
        return [returned]
    return [returned, *serve_waitlist(book, cmd.sale_id, cmd.sku, now, returned.sequence,
                                      returned.remaining, len(book.holds))]  # fmt: skip


def decide_settle(ledger: SkuLedger, cmd: SettleSale, now: int) -> list[Event]:
    """``SaleSettled`` once for a closed or ended sale; refused while it is still open."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or book.settled:
        return []
    seq = book.sequence + 1
    if not (book.closed or now >= book.terms.ends_at_ms):
        return [SaleRefused(cmd.sale_id, cmd.sku, "SettleSale",
                            "sale still open: close it before settling", seq, now)]  # fmt: skip
    if book.holds:  # a held order may still be paid: its state stays until it is decided
        return [SaleRefused(cmd.sale_id, cmd.sku, "SettleSale",
                            f"{len(book.holds)} holds outstanding", seq, now)]  # fmt: skip
    events: list[Event] = []
    if book.queueing:  # ended undrawn, and nothing told the queue yet
        events = expire(book, cmd.sale_id, cmd.sku, now, "the sale ended before the draw")
        seq += len(events)
    elif book.paused:  # ended paused, and nothing decided what waited yet
        events = unpause(ledger, cmd.sale_id, now, [])
        seq += len(events)
    decided = len(book.decided) + len(book.queue) + len(book.deferred)
    return [*events, SaleSettled(cmd.sale_id, cmd.sku, decided, book.remaining, seq, now)]


def evolve_opened(ledger: SkuLedger, event: SaleOpened) -> None:
    """A book with the terms; it continues the numbering of events before it."""
    t = event.terms
    ledger.sales[t.sale_id] = SaleBook(t, t.allocation, sequence=event.sequence)


def evolve_refused(ledger: SkuLedger, event: SaleRefused) -> None:
    """Nothing but the sequence moves."""
    book = ledger.sales.get(event.sale_id)
    if book is None:
        ledger.orphan_sequences[event.sale_id] = event.sequence
    else:
        book.sequence = event.sequence


def evolve_closed(ledger: SkuLedger, event: SaleClosed) -> None:
    """The book is closed."""
    book = ledger.sales[event.sale_id]
    book.closed, book.sequence = True, event.sequence


def evolve_returned(ledger: SkuLedger, event: UnitsReturned) -> None:
    """Units are back; the ref is spent."""
    book = ledger.sales[event.sale_id]
    book.remaining, book.sequence = event.remaining, event.sequence
    book.returns.add(event.ref)


def evolve_settled(ledger: SkuLedger, event: SaleSettled) -> None:
    """Per-intent state becomes a digest per decided intent id."""
    book = ledger.sales[event.sale_id]
    book.settled_digests = frozenset(map(intent_digest, book.decided))
    book.decided, book.bought, book.returns = set(), {}, set()
    book.closed = book.settled = True
    book.remaining, book.sequence = event.remaining, event.sequence
