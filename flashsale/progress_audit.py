"""The sale audit's check of ``QueueProgress``: recomputed from the sale's facts and the
command topic, so a writer that leaves one out, adds one, or names the wrong place in its
input is caught (``processors.core.progress`` says where they belong)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from processors.core import progress_due

Fact = tuple[str, dict[str, Any]]


def expected_progress(events: list[Fact]) -> dict[tuple[str, int], tuple[int, bool, Fact]]:
    """(SKU, the sequence it follows) -> (remaining, sold out, that event) of every progress
    fact the sale's events call for."""
    by_sku: dict[str, list[Fact]] = defaultdict(list)
    opened: dict[str, int | None] = {}
    for name, rec in events:
        by_sku[rec["sku"]].append((name, rec))
        if name == "SaleOpened":
            opened[rec["sku"]] = rec.get("progress_every")
    due: dict[tuple[str, int], tuple[int, bool, Fact]] = {}
    for sku, facts in by_sku.items():
        every = opened.get(sku)
        if not every:
            continue
        remaining: int | None = None  # no book before the sale opened: nothing is due
        for name, rec in sorted(facts, key=lambda f: f[1]["sequence"]):
            before = remaining
            if name == "SaleOpened":
                remaining = rec["allocation"]
            elif "remaining" in rec and remaining is not None:
                remaining = rec["remaining"]
            if remaining is None:
                continue
            was = 0 if before is None else before
            if progress_due(every, rec["sequence"], was, remaining):
                due[sku, rec["sequence"]] = (remaining, was > 0 >= remaining, (name, rec))
    return due


def check_progress(
    events: list[Fact],
    progress: list[dict[str, Any]],
    commands: dict[tuple[int, int], tuple[str, dict[str, Any], int]],
) -> list[tuple[str, str]]:
    """(kind, detail) of each way the progress facts differ from what the events call for.

    Each must be in the log once, with the remaining count its event left, naming the input
    record (partition, offset) of the command that caused that event: appended at the
    event's log time, and, for an intent, that intent's own record (an intent causes the
    decision of another only when it finds a pre-queue expired). None other may be there.
    ``commands`` maps (partition, offset) to the command topic's (name, record, append time).
    """
    found: list[tuple[str, str]] = []
    due = expected_progress(events)
    seen: set[tuple[str, int]] = set()
    for rec in progress:
        key = (rec["sku"], rec["after_sequence"])
        where = f"{key[0]} after #{key[1]}"
        want = due.get(key)
        if want is None or key in seen:
            found.append(("progress-unexpected", f"{where}: no progress fact belongs here"))
            continue
        seen.add(key)
        got = (rec["remaining"], rec["sold_out"])
        if got != want[:2] or rec["decided_at"] != want[2][1]["decided_at"]:
            found.append(("progress-mismatch", f"{where}: says {got} at {rec['decided_at']}, "
                          f"the events say {want[:2]} at {want[2][1]['decided_at']}"))  # fmt: skip
        place = (rec["input_partition"], rec["input_offset"])
        problem = _not_its_cause(commands.get(place), want[2])
        if problem is not None:
            found.append(("progress-offset", f"{where}: input {place[0]}:{place[1]} {problem}"))
    for key in sorted(set(due) - seen):
        found.append(("progress-missing", f"{key[0]} after #{key[1]}: no progress fact"))
    return found


# The command(s) each kind of event comes from (None: whichever command saw the sale's end).
_CAUSE: dict[str, str | tuple[str, ...] | None] = {
    "SaleOpened": "OpenSale",
    "SaleClosed": "CloseSale",
    "UnitsReturned": "ReturnUnits",
    "SaleSettled": "SettleSale",
    "DrawRevealed": "RevealDraw",
    "QueueExpired": None,
    "PaymentStarted": "StartPayment",
    "PaymentDeclined": "RecordPayment",
    "OrderPaid": "RecordPayment",
    "PaymentVoided": "RecordPayment",
    "HoldCancelled": ("CancelHold", "CancelSale"),
    "HoldExpired": None,
    "SalePaused": "PauseSale",
    "SaleResumed": None,  # resumed, or the sale closed, ended, was cancelled or settled
    "UnitsAdded": "AddUnits",
    "SaleCancelled": "CancelSale",
    "OrderRefunded": "CancelSale",
}


def _not_its_cause(command: tuple[str, dict[str, Any], int] | None, event: Fact) -> str | None:
    """Why the input record ``command`` cannot be what caused ``event``, or None."""
    if command is None:
        return "is not a record of the command topic"
    name, rec, at = command
    ev_name, ev = event
    if at != ev["decided_at"]:
        return f"was appended at {at}, the event it follows at {ev['decided_at']}"
    if rec.get("sku") not in (None, ev["sku"]):
        return f"is a command for {rec['sku']!r}"
    if "intent_id" in ev:  # a decision or a queued or waitlisted intent
        # An intent's own record decides it, or a command that decides intents waiting
        # (the draw, a tick or a payment or cancel that moved the waitlist, a return of
        # units); another intent's record only rejects a queue or a pause the sale's end resolved.
        if name != "PurchaseIntent" or rec["intent_id"] == ev["intent_id"]:
            return None
        if ev.get("reason") in ("DRAW_NOT_REVEALED", "SALE_ENDED"):
            return None  # a queue or a pause the sale's end resolved, seen by any command
        return f"is intent {rec['intent_id']}, not {ev['intent_id']} of the {ev_name} it follows"
    want = ev["command"] if ev_name in ("SaleRefused", "OrderRefused") else _CAUSE.get(ev_name)
    wanted = (want,) if isinstance(want, str) else want
    if wanted is not None and name not in wanted:
        return f"is a {name}, the {ev_name} it follows comes from a {' or '.join(wanted)}"
    return None
