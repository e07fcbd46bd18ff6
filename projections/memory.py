"""The outcomes projection's store in memory: the same contract as ``projections.store``.

For unit tests of projection logic without PostgreSQL, and as the executable statement of
what the SQL must do (tests/integration/test_projection_store_contract.py runs the same cases
on both): a decision counts once per intent id whatever batch it arrives in; counters add
up and follow the greatest sequence; a sale's counters start at its allocation.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from projections.rows import BatchRows, LifecycleRow, counter_rows, utc

# An order's final facts, in the order they win (migration 0013's ``order_status``).
_FINAL = (("OrderRefunded", "refunded"), ("OrderPaid", "paid"), ("HoldExpired", "expired"),
          ("HoldCancelled", "cancelled"))  # fmt: skip
_PAYING = ("PaymentStarted", "PaymentDeclined")


class MemoryOutcomeStore:
    """Sales, intent outcomes and sale counters as dicts (orders: the accepted outcomes)."""

    def __init__(self) -> None:
        self.sales: dict[tuple[str, str], list[Any]] = {}
        self.outcomes: dict[str, tuple[Any, ...]] = {}
        self.counters: dict[tuple[str, str], list[Any]] = {}
        self.lifecycle: dict[tuple[str, str, int], LifecycleRow] = {}

    def write(self, rows: BatchRows) -> int:
        """Apply one batch; return the outcomes that were new."""
        for sale in rows.sales:
            key = (sale[0], sale[1])
            self.sales.setdefault(key, [*sale[:7], False, sale[7], sale[8]])
            self.counters.setdefault(key, [0, 0, 0, {}, sale[2], 0])
        for sale_id, sku in rows.closures:
            if (sale_id, sku) in self.sales:
                self.sales[(sale_id, sku)][7] = True
        for row in rows.lifecycle:
            self.lifecycle.setdefault((row[0], row[1], row[2]), row)
        inserted = [o for o in rows.outcomes.values() if o[0] not in self.outcomes]
        for outcome in inserted:
            self.outcomes[outcome[0]] = outcome
        for sale_id, sku, won, units, lost, by, remaining, last in counter_rows(
            inserted, rows.marks
        ):
            c = self.counters.get((sale_id, sku))
            if c is None:
                self.counters[(sale_id, sku)] = [won, units, lost, dict(by), remaining, last]
                continue
            c[0], c[1], c[2] = c[0] + won, c[1] + units, c[2] + lost
            c[3] = {r: c[3].get(r, 0) + by.get(r, 0) for r in {*c[3], *by}}
            if last > c[5]:
                c[4], c[5] = remaining, last
        return len(inserted)

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table as sorted tuples, timestamps as UTC datetimes (like ``store.dump``)."""
        return {
            "sales": sorted(tuple(s) for s in self.sales.values()),
            "orders": sorted(  # a view over the accepted outcomes, as in PostgreSQL
                (o[8], *o[:5], utc(o[11]), o[10], *self._status(o))
                for o in self.outcomes.values()
                if o[5] == "accepted"
            ),
            "intent_outcomes": sorted(
                (*o[:11], utc(o[11]), *o[12:]) for o in self.outcomes.values()
            ),
            "sale_counters": sorted((*k, *c) for k, c in self.counters.items()),
            "lifecycle_events": sorted(self.lifecycle.values()),
        }

    def _status(self, outcome: tuple[Any, ...]) -> tuple[str, Any]:
        """(status, pay_by) of an accepted outcome's order, as the ``orders`` view says."""
        sale = self.sales.get((outcome[1], outcome[2]))
        hold_ms = None if sale is None else sale[9]
        pay_by = None if hold_ms is None else utc(outcome[11]) + timedelta(milliseconds=hold_ms)
        facts = sorted((r[2], r[3]) for r in self.lifecycle.values() if r[4] == outcome[8])
        kinds = {kind for _, kind in facts}
        for kind, status in _FINAL:
            if kind in kinds:
                return status, pay_by
        paying = [kind for _, kind in facts if kind in _PAYING]
        if paying:
            return ("paying" if paying[-1] == "PaymentStarted" else "held"), pay_by
        return ("confirmed" if hold_ms is None else "held"), pay_by
