"""Pure mapping from decoded records to the projection's rows (no Kafka, no Postgres).

Rows are tuples in the column order of the statements in ``projections.store``; the sales'
timestamps become timezone-aware UTC datetimes, outcomes keep epoch milliseconds until
``outcomes_copy`` writes them as ``COPY`` text. Orders are a view over accepted outcomes
(migration 0005) and their lifecycle facts (migration 0013), so they have no rows of their
own here.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from processors.records import DECISION_RECORDS

MARKED_FACTS = ("SaleClosed", "UnitsReturned", "SaleSettled", "HoldExpired", "HoldCancelled",
                "UnitsAdded", "OrderRefunded", "SaleCancelled", "SalePaused")  # fmt: skip
"""Sale facts that carry a remaining count (closing ones close the SKU too)."""
_CLOSING = ("SaleClosed", "SaleSettled", "SaleCancelled")
LIFECYCLE_FACTS = frozenset({"PaymentStarted", "PaymentDeclined", "OrderPaid", "PaymentVoided",
                             "OrderRefused", "HoldExpired", "HoldCancelled", "OrderRefunded",
                             "Waitlisted", "IntentDeferred", "SalePaused", "SaleResumed",
                             "UnitsAdded", "SaleCancelled"})  # fmt: skip
"""Facts of the order lifecycle and the operator's controls: one ``lifecycle_events`` row each."""

LifecycleRow = tuple[
    str, str, int, str, str | None, str | None, str | None, str | None, int | None, str | None,
    datetime,
]  # fmt: skip
"""sale_id, sku, sequence, kind, order_id, intent_id, attempt_id, user_id, quantity, detail,
decided_at (the fields a kind has; None for the others)."""

SaleRow = tuple[str, str, int, int, int, datetime, datetime, str, int | None]
"""sale_id, sku, allocation, per_user_limit, per_order_max, starts_at, ends_at, event_id,
hold_ms (None: no holds)."""

ClosureRow = tuple[str, str]
"""sale_id, sku."""

OutcomeRow = tuple[
    str, str, str, str, int, str, str | None, str, str | None, int, int, int, int | None, int | None
]
"""intent_id, sale_id, sku, user_id, quantity, outcome, reason, detail, order_id, remaining,
sequence, decided_at (epoch ms: turned into timestamptz text by ``outcomes_copy``), draw_rank,
draw_size (its rank k of n in a pre-queue's draw; None when it was not drawn)."""


def utc(millis: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime (exact to the millisecond)."""
    return datetime.fromtimestamp(millis // 1000, UTC).replace(microsecond=(millis % 1000) * 1000)


def sale_row(record: dict[str, Any]) -> SaleRow:
    """``sales`` row from a SaleOpened record."""
    r = record
    return (
        r["sale_id"],
        r["sku"],
        r["allocation"],
        r["per_user_limit"],
        r["per_order_max"],
        utc(r["starts_at"]),
        utc(r["ends_at"]),
        r["event_id"],
        r.get("hold_ms"),
    )


def lifecycle_row(name: str, record: dict[str, Any]) -> LifecycleRow:
    """``lifecycle_events`` row from a lifecycle or operator fact."""
    r = record
    attempt = r.get("attempt_id") or (r.get("ref") if name == "OrderRefused" else None)
    detail = r.get("detail") or r.get("reason") or r.get("ref") or None
    return (r["sale_id"], r["sku"], r["sequence"], name, r.get("order_id"), r.get("intent_id"),
            attempt or None, r.get("user_id"), r.get("quantity"), detail,
            utc(r["decided_at"]))  # fmt: skip


def outcome_row(name: str, record: dict[str, Any]) -> OutcomeRow:
    """``intent_outcomes`` row from an IntentAccepted or IntentRejected record."""
    r = record
    if name == "IntentAccepted":
        outcome, reason, detail, order_id = "accepted", None, "", r["order_id"]
    elif name == "IntentRejected":
        outcome, reason, detail, order_id = "rejected", r["reason"], r.get("detail", ""), None
    else:
        raise ValueError(f"not a decision record: {name!r}")
    return (
        r["intent_id"],
        r["sale_id"],
        r["sku"],
        r["user_id"],
        r["quantity"],
        outcome,
        reason,
        detail,
        order_id,
        r["remaining"],
        r["sequence"],
        r["decided_at"],
        r.get("draw_rank") or None,
        r.get("draw_size") or None,
    )


Mark = tuple[str, str, int, int]
"""sale_id, sku, remaining, sequence: a sale fact's remaining count (for ``sale_counters``)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """The store's input when every outcome of a batch is new (the normal case): ``COPY``
    text and counters.

    The outcomes projection makes it in ``rows``, on the runner's main thread, so the
    pipelined writer thread has little Python left to run while it holds the GIL against the
    next batch's decoding. After a unique-key conflict the store makes them again from the
    rows actually inserted.
    """

    outcomes_text: str
    counters: list[CounterRow]


@dataclass
class BatchRows:
    """Rows of one consumed batch, in log order, each decision once per intent id."""

    only_sales: Collection[str] | None = None
    sales: list[SaleRow] = field(default_factory=list)
    closures: list[ClosureRow] = field(default_factory=list)
    outcomes: dict[str, OutcomeRow] = field(default_factory=dict)
    marks: list[Mark] = field(default_factory=list)
    lifecycle: list[LifecycleRow] = field(default_factory=list)
    facts: int = 0  # sale facts other than openings: closures, counts, lifecycle rows
    skipped: int = 0
    _prepared: Prepared | None = field(default=None, init=False, repr=False, compare=False)

    def add(self, name: str, record: dict[str, Any]) -> bool:
        """Add one decoded record; False when it carries no projected state (or is filtered)."""
        if self.only_sales is not None and record.get("sale_id") not in self.only_sales:
            self.skipped += 1
            return False
        r = record
        self._prepared = None  # made again from every row when next asked for
        if name in DECISION_RECORDS:
            # A redelivered decision repeats the first one identically: keep the first.
            self.outcomes.setdefault(r["intent_id"], outcome_row(name, r))
            return True
        if name == "SaleOpened":
            self.sales.append(sale_row(r))
            self.marks.append((r["sale_id"], r["sku"], r["allocation"], r["sequence"]))
        elif name in MARKED_FACTS or name in LIFECYCLE_FACTS:
            self.facts += 1
            if name in LIFECYCLE_FACTS:
                self.lifecycle.append(lifecycle_row(name, r))
            if name in _CLOSING:  # closed, cancelled, or settled (after its end: closed too)
                self.closures.append((r["sale_id"], r["sku"]))
            if name in MARKED_FACTS:
                self.marks.append((r["sale_id"], r["sku"], r["remaining"], r["sequence"]))
        else:  # SaleRefused: nothing changed
            self.skipped += 1
            return False
        return True

    def prepared(self) -> Prepared:
        """What the store sends if every outcome is new (made once; see ``Prepared``)."""
        if self._prepared is None:
            outcomes = self.outcomes.values()
            self._prepared = Prepared(outcomes_copy(outcomes), counter_rows(outcomes, self.marks))
        return self._prepared

    def __len__(self) -> int:
        """Records that carry projected state (a redelivered decision counted once)."""
        return len(self.sales) + len(self.outcomes) + self.facts


CounterRow = tuple[str, str, int, int, int, dict[str, int], int, int]
"""sale_id, sku, accepted_intents, accepted_units, rejected_intents, rejected_by_reason,
remaining, last_sequence: what one batch adds to a (sale, SKU)'s ``sale_counters`` row."""


def counter_rows(outcomes: Iterable[OutcomeRow], marks: Iterable[Mark] = ()) -> list[CounterRow]:
    """Per (sale, SKU): the counts of ``outcomes``, and the remaining of the greatest sequence
    among them and the sale facts' ``marks``.

    A rejection of a sale not open yet (``UNKNOWN_SALE``) says 0 remaining; its SaleOpened
    comes later in the (sale, SKU)'s numbering and so sets the allocation whatever the order
    the rows are written in.
    """
    acc: dict[tuple[str, str], list[Any]] = {}
    for _, sale_id, sku, _, quantity, outcome, reason, _, _, remaining, sequence, *_ in outcomes:
        c = acc.get((sale_id, sku))
        if c is None:
            c = acc[(sale_id, sku)] = [0, 0, 0, {}, 0, 0]
        if outcome == "accepted":
            c[0] += 1
            c[1] += quantity
        else:
            c[2] += 1
            c[3][reason] = c[3].get(reason, 0) + 1
        if sequence > c[5]:
            c[4], c[5] = remaining, sequence
    for sale_id, sku, remaining, sequence in marks:
        c = acc.get((sale_id, sku))
        if c is None:
            c = acc[(sale_id, sku)] = [0, 0, 0, {}, 0, 0]
        if sequence > c[5]:
            c[4], c[5] = remaining, sequence
    return [(s, k, *c) for (s, k), c in acc.items()]


_SPECIAL = re.compile(r"[\\\t\n\r]")
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_seconds: dict[int, str] = {}


def _timestamp(millis: int) -> str:
    """``YYYY-MM-DD HH:MM:SS.mmm+00`` (the date part cached per second: decisions bunch up)."""
    second, ms = divmod(millis, 1000)
    text = _seconds.get(second)
    if text is None:
        if len(_seconds) > 100_000:
            _seconds.clear()
        text = _seconds[second] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{ms:03d}+00"


def _text(value: str | None) -> str:
    if value is None:
        return "\\N"
    # translate() looks up every character: search first, escape the rare value that needs it.
    return value.translate(_ESCAPE) if _SPECIAL.search(value) else value


_NULL = "\\N"


def outcomes_copy(rows: Iterable[OutcomeRow]) -> str:
    """Outcome rows as ``COPY intent_outcomes (<OutcomeRow columns>) FROM STDIN`` text.

    Text columns are escaped (backslash, tab, newline, CR), NULL is ``\\N``, the decision
    time is written from its epoch milliseconds.
    """
    t, ts = _text, _timestamp
    return "".join(
        f"{t(i)}\t{t(s)}\t{t(k)}\t{t(u)}\t{q}\t{o}\t{t(r)}\t{t(d)}\t{t(oid)}\t{rem}\t{seq}\t{ts(at)}"
        f"\t{_NULL if rank is None else rank}\t{_NULL if size is None else size}\n"
        for i, s, k, u, q, o, r, d, oid, rem, seq, at, rank, size in rows
    )
