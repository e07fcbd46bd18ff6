"""The order lifecycle rule family: holds, payments, expiry, cancellation.

For a sale with ``terms.hold_ms`` an accepted intent holds its units until ``pay_by`` (log
time). Rules, all judged on log time:

- ``StartPayment`` by the owner of a held order with no attempt in progress, before
  ``pay_by``: ``PaymentStarted``. Otherwise ``OrderRefused`` (unknown order, not the owner,
  paid or released already, an attempt in progress, the deadline passed: then the hold
  expires in the same breath). A repeated attempt id yields nothing.
- ``RecordPayment`` of a started attempt: a success by ``pay_by + pay_grace_ms`` pays the
  order (``OrderPaid``); a success after that, for a hold that is gone, or for an attempt
  never started is ``PaymentVoided`` (the payment service refunds it; it never revives a
  hold); a decline is ``PaymentDeclined`` and the hold goes on. One outcome per attempt.
- ``CancelHold`` by the owner with no attempt in progress: ``HoldCancelled``, units back.
- Each clock ``Tick`` expires every hold past its deadline (``pay_by``, or ``pay_by +
  pay_grace_ms`` while an attempt is in progress) in deadline order: ``HoldExpired``, units
  back. A late tick (the clock stopped) expires late, never twice and never early.

A released hold keeps counting against its user's limit: one chance per person per sale.
Invariant: remaining + held units + paid units = allocation + units added or returned by
operators (``processors.core.operations``; a refunded order's units are back in remaining).
"""

from __future__ import annotations

from processors.core.lifecycle_model import (
    CancelHold,
    Hold,
    HoldCancelled,
    HoldExpired,
    OrderPaid,
    OrderRefused,
    PaymentDeclined,
    PaymentStarted,
    PaymentVoided,
    RecordPayment,
    StartPayment,
    Waitlisted,
)
from processors.core.model import (
    Event,
    IntentAccepted,
    IntentRejected,
    PlaceIntent,
    RejectionReason,
    SaleBook,
    SkuLedger,
    order_id_for,
)

_NO_UNIT = (RejectionReason.SOLD_OUT, RejectionReason.INSUFFICIENT_STOCK)


def waitlisted(
    book: SaleBook, cmd: PlaceIntent, fault: RejectionReason, now: int
) -> Waitlisted | None:
    """The intent waits instead of being rejected for ``fault`` when it found no unit, held
    units may still come back, the waitlist has room and the user's limit leaves room."""
    if (
        fault not in _NO_UNIT
        or not book.holds
        or len(book.waitlist) >= book.terms.waitlist_depth
        or book.bought.get(cmd.user_id, 0) + cmd.quantity > book.terms.per_user_limit
    ):
        return None
    return Waitlisted(cmd.intent_id, cmd.sale_id, cmd.sku, cmd.user_id, cmd.quantity,
                      len(book.waitlist) + 1, book.sequence + 1, now)  # fmt: skip


def serve_waitlist(
    book: SaleBook,
    sale_id: str,
    sku: str,
    now: int,
    seq: int,
    remaining: int,
    holds: int,
    ended: bool = False,
) -> list[Event]:
    """After a command's own events (numbered up to ``seq``) left ``remaining`` units and
    ``holds`` holds: the waitlist's decisions. Every waiting intent whose quantity fits is
    served, in line order (a hold each; ``USER_LIMIT`` if the user got units meanwhile);
    when no hold is left no unit can come back, and once the sale is over (``ended``, or by
    ``now``) none is served: everyone still waiting is rejected at once."""
    events: list[Event] = []
    over = ended or book.closed or now >= book.terms.ends_at_ms
    bought: dict[str, int] = {}
    limit = book.terms.per_user_limit
    left: list[tuple[str, str, int]] = []
    for intent_id, user_id, q in book.waitlist:
        if over or q > remaining:
            left.append((intent_id, user_id, q))
            continue
        seq += 1
        had = book.bought.get(user_id, 0) + bought.get(user_id, 0)
        if had + q > limit:
            events.append(IntentRejected(intent_id, sale_id, sku, user_id, q,
                                         RejectionReason.USER_LIMIT,
                                         f"{had} + {q} > limit {limit}", remaining, seq,
                                         now))  # fmt: skip
            continue
        remaining -= q
        holds += 1
        bought[user_id] = bought.get(user_id, 0) + q
        events.append(IntentAccepted(intent_id, sale_id, sku, user_id, q, order_id_for(intent_id),
                                     remaining, seq, now, pay_by=pay_by(book, now)))  # fmt: skip
    if over or holds == 0:
        reason, detail = ((RejectionReason.SALE_ENDED, "the sale ended") if over
                          else (RejectionReason.SOLD_OUT, "no unit can come back"))  # fmt: skip
        for intent_id, user_id, q in left:
            seq += 1
            events.append(IntentRejected(intent_id, sale_id, sku, user_id, q, reason, detail,
                                         remaining, seq, now))  # fmt: skip
    return events


def _then_serve(book: SaleBook, events: list[Event], now: int) -> list[Event]:
    """``events`` of one command, followed by what they make of the waitlist."""
    if not book.waitlist or not events:
        return events
    remaining, holds = book.remaining, len(book.holds)
    for e in events:
        if type(e) is HoldExpired or type(e) is HoldCancelled:
            remaining, holds = e.remaining, holds - 1
        elif type(e) is OrderPaid:
            holds -= 1
    last = events[-1]
    return [*events, *serve_waitlist(book, last.sale_id, last.sku, now, last.sequence,
                                     remaining, holds)]  # fmt: skip


def pay_by(book: SaleBook, now: int) -> int:
    """The deadline of an order accepted at log time ``now`` (0: the sale has no holds)."""
    hold_ms = book.terms.hold_ms
    return 0 if hold_ms is None else now + hold_ms


def overdue(book: SaleBook, hold: Hold, now: int) -> bool:
    """Whether ``hold`` has expired by log time ``now``."""
    if hold.attempt is None:
        return now >= hold.pay_by
    return now > hold.pay_by + book.terms.pay_grace_ms


def _expired(book: SaleBook, sale_id: str, sku: str, order_id: str, now: int, seq: int) -> Event:
    hold = book.holds[order_id]
    return HoldExpired(sale_id, sku, order_id, hold.user_id, hold.quantity,
                       book.remaining + hold.quantity, seq, now)  # fmt: skip


def _refused(cmd: StartPayment | CancelHold, detail: str, seq: int, now: int) -> OrderRefused:
    ref = cmd.attempt_id if isinstance(cmd, StartPayment) else ""
    return OrderRefused(cmd.sale_id, cmd.sku, cmd.order_id, type(cmd).__name__, ref, detail,
                        seq, now)  # fmt: skip


def _gone(book: SaleBook, order_id: str) -> str:
    state = book.orders.get(order_id)
    return "no such order in this sale" if state is None else f"the order is {state}"


def decide_start(ledger: SkuLedger, cmd: StartPayment, now: int) -> list[Event]:
    """``PaymentStarted``, or why not (``OrderRefused``); nothing for a repeated attempt."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None or cmd.attempt_id in book.attempts:
        return []
    seq = book.sequence + 1
    hold = book.holds.get(cmd.order_id)
    if hold is None:
        return [_refused(cmd, _gone(book, cmd.order_id), seq, now)]
    if hold.user_id != cmd.user_id:
        return [_refused(cmd, "the order belongs to another user", seq, now)]
    if hold.attempt is not None:
        return [_refused(cmd, f"payment {hold.attempt} is in progress", seq, now)]
    if now >= hold.pay_by:
        expired = _expired(book, cmd.sale_id, cmd.sku, cmd.order_id, now, seq)
        refused = _refused(cmd, "the payment deadline passed", seq + 1, now)
        return _then_serve(book, [expired, refused], now)
    return [PaymentStarted(cmd.sale_id, cmd.sku, cmd.order_id, cmd.attempt_id, cmd.user_id,
                           hold.pay_by, seq, now)]  # fmt: skip


def decide_record(ledger: SkuLedger, cmd: RecordPayment, now: int) -> list[Event]:
    """The one outcome of an attempt: paid, voided (refund it) or declined."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None:
        return []
    state = book.attempts.get(cmd.attempt_id)
    if state not in (None, "started"):
        return []  # its outcome is in the log already
    seq = book.sequence + 1
    hold = book.holds.get(cmd.order_id)
    current = state == "started" and hold is not None and hold.attempt == cmd.attempt_id
    if not cmd.succeeded:
        if state is None:
            return []  # never started, nothing charged: nothing to answer
        declined = PaymentDeclined(cmd.sale_id, cmd.sku, cmd.order_id, cmd.attempt_id, seq, now)
        return [declined]
    if state is None:
        detail = "this payment was never started"
    elif not current:
        detail = _gone(book, cmd.order_id)
    elif hold is not None and now <= hold.pay_by + book.terms.pay_grace_ms:
        paid = OrderPaid(cmd.sale_id, cmd.sku, cmd.order_id, cmd.attempt_id, hold.user_id,
                         hold.quantity, seq, now)  # fmt: skip
        return _then_serve(book, [paid], now)
    else:  # charged too late: refunded, and the hold it was for expires now
        voided = PaymentVoided(cmd.sale_id, cmd.sku, cmd.order_id, cmd.attempt_id,
                               "paid after the deadline and its grace", seq, now)  # fmt: skip
        expired = _expired(book, cmd.sale_id, cmd.sku, cmd.order_id, now, seq + 1)
        return _then_serve(book, [voided, expired], now)
    return [PaymentVoided(cmd.sale_id, cmd.sku, cmd.order_id, cmd.attempt_id, detail, seq, now)]


def decide_cancel(ledger: SkuLedger, cmd: CancelHold, now: int) -> list[Event]:
    """``HoldCancelled`` for the owner of a held order with no payment in progress."""
    book = ledger.sales.get(cmd.sale_id)
    if book is None:
        return []
    seq = book.sequence + 1
    hold = book.holds.get(cmd.order_id)
    if hold is None:
        if book.orders.get(cmd.order_id) == "cancelled":
            return []  # cancelled already: a repeat
        return [_refused(cmd, _gone(book, cmd.order_id), seq, now)]
    if hold.user_id != cmd.user_id:
        return [_refused(cmd, "the order belongs to another user", seq, now)]
    if hold.attempt is not None:
        return [_refused(cmd, f"payment {hold.attempt} is in progress", seq, now)]
    cancelled = HoldCancelled(cmd.sale_id, cmd.sku, cmd.order_id, hold.user_id, hold.quantity,
                              book.remaining + hold.quantity, seq, now)  # fmt: skip
    return _then_serve(book, [cancelled], now)


def expire_due(book: SaleBook, sale_id: str, sku: str, now: int) -> list[Event]:
    """``HoldExpired`` for every hold of ``book`` overdue at ``now``, by deadline then id."""
    due = sorted((h.pay_by, order_id) for order_id, h in book.holds.items()
                 if overdue(book, h, now))  # fmt: skip
    events: list[Event] = []
    seq, remaining = book.sequence, book.remaining
    for _, order_id in due:
        hold = book.holds[order_id]
        seq, remaining = seq + 1, remaining + hold.quantity
        events.append(HoldExpired(sale_id, sku, order_id, hold.user_id, hold.quantity, remaining,
                                  seq, now))  # fmt: skip
    return _then_serve(book, events, now)


# -- evolve -----------------------------------------------------------------------------


def evolve_held(book: SaleBook, event: IntentAccepted) -> None:
    """An accepted intent of a sale with holds: its order is held until ``pay_by``."""
    book.holds[event.order_id] = Hold(event.intent_id, event.user_id, event.quantity,
                                      event.pay_by)  # fmt: skip


def evolve_started(ledger: SkuLedger, event: PaymentStarted) -> None:
    book = ledger.sales[event.sale_id]
    book.holds[event.order_id] = book.holds[event.order_id]._replace(attempt=event.attempt_id)
    book.attempts[event.attempt_id] = "started"
    book.sequence = event.sequence


def evolve_refused(ledger: SkuLedger, event: OrderRefused) -> None:
    book = ledger.sales[event.sale_id]
    if event.ref:
        book.attempts[event.ref] = "refused"
    book.sequence = event.sequence


def evolve_declined(ledger: SkuLedger, event: PaymentDeclined) -> None:
    book = ledger.sales[event.sale_id]
    hold = book.holds.get(event.order_id)
    if hold is not None and hold.attempt == event.attempt_id:
        book.holds[event.order_id] = hold._replace(attempt=None)
    book.attempts[event.attempt_id] = "declined"
    book.sequence = event.sequence


def evolve_paid(ledger: SkuLedger, event: OrderPaid) -> None:
    book = ledger.sales[event.sale_id]
    book.paid[event.order_id] = book.holds.pop(event.order_id)
    book.orders[event.order_id] = "paid"
    book.attempts[event.attempt_id] = "paid"
    book.sequence = event.sequence


def evolve_voided(ledger: SkuLedger, event: PaymentVoided) -> None:
    book = ledger.sales[event.sale_id]
    book.attempts[event.attempt_id] = "voided"
    book.sequence = event.sequence


def evolve_waitlisted(ledger: SkuLedger, event: Waitlisted) -> None:
    """The intent waits at the end of the line."""
    book = ledger.sales[event.sale_id]
    book.waitlist.append((event.intent_id, event.user_id, event.quantity))
    book.waitlisted_ids.add(event.intent_id)
    book.sequence = event.sequence


def leave_waitlist(book: SaleBook, intent_id: str) -> None:
    """A waitlisted intent got its decision (in line order: almost always the head)."""
    book.waitlisted_ids.discard(intent_id)
    if book.waitlist and book.waitlist[0][0] == intent_id:
        book.waitlist.pop(0)
    else:
        book.waitlist = [e for e in book.waitlist if e[0] != intent_id]


def evolve_released(ledger: SkuLedger, event: HoldExpired | HoldCancelled) -> None:
    """The hold is gone and its units are back in the sale."""
    book = ledger.sales[event.sale_id]
    del book.holds[event.order_id]
    book.orders[event.order_id] = "expired" if type(event) is HoldExpired else "cancelled"
    book.remaining = event.remaining
    book.sequence = event.sequence
