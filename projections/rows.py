"""Pure mapping from decoded records to the projection's rows (no Kafka, no Postgres).

Rows are tuples in the column order of the INSERTs in ``projections.store``; timestamps are
converted from epoch milliseconds to timezone-aware UTC datetimes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DECISION_RECORDS = ("IntentAccepted", "IntentRejected")

SaleRow = tuple[str, str, int, int, int, datetime, datetime, str]
"""sale_id, sku, allocation, per_user_limit, per_order_max, starts_at, ends_at, event_id."""

ClosureRow = tuple[str, str]
"""sale_id, sku."""

OutcomeRow = tuple[str, str, str, str, int, str, str | None, str, str | None, int, int, datetime]
"""intent_id, sale_id, sku, user_id, quantity, outcome, reason, detail, order_id, remaining,
sequence, decided_at."""

OrderRow = tuple[str, str, str, str, str, int, datetime, int]
"""order_id, intent_id, sale_id, sku, user_id, quantity, decided_at, sequence."""


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
    )


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
        utc(r["decided_at"]),
    )


def order_row(outcome: OutcomeRow) -> OrderRow | None:
    """``orders`` row for an accepted outcome; None for a rejected one."""
    intent_id, sale_id, sku, user_id, quantity, _, _, _, order_id, _, sequence, decided_at = outcome
    if order_id is None:
        return None
    return (order_id, intent_id, sale_id, sku, user_id, quantity, decided_at, sequence)


@dataclass
class BatchRows:
    """Rows of one consumed batch, in log order, each decision once per intent id."""

    only_sales: Collection[str] | None = None
    sales: list[SaleRow] = field(default_factory=list)
    closures: list[ClosureRow] = field(default_factory=list)
    outcomes: dict[str, OutcomeRow] = field(default_factory=dict)
    skipped: int = 0

    def add(self, name: str, record: dict[str, Any]) -> bool:
        """Add one decoded record; False when it carries no projected state (or is filtered)."""
        if self.only_sales is not None and record.get("sale_id") not in self.only_sales:
            self.skipped += 1
            return False
        if name in DECISION_RECORDS:
            # A redelivered decision repeats the first one identically: keep the first.
            self.outcomes.setdefault(record["intent_id"], outcome_row(name, record))
        elif name == "SaleOpened":
            self.sales.append(sale_row(record))
        elif name == "SaleClosed":
            self.closures.append((record["sale_id"], record["sku"]))
        else:  # PurchaseIntent and anything else on the input topic: nothing to project
            self.skipped += 1
            return False
        return True

    def orders(self) -> list[OrderRow]:
        """``orders`` rows for the accepted outcomes."""
        return [o for o in map(order_row, self.outcomes.values()) if o is not None]

    def __len__(self) -> int:
        return len(self.sales) + len(self.closures) + len(self.outcomes)
