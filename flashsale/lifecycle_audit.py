"""The sale audit's check of the order lifecycle, from the facts alone.

Per SKU of a sale with holds, walking its facts in sequence order with a state per order
(held, paid, expired, cancelled), independently of the writer's code:

- every transition starts from the state it must (a payment pays a held order once; a hold
  expires or is cancelled only while held; nothing revives a released order);
- every unit is in exactly one place at every point: remaining + held + paid = allocation
  + units added and returned by operators, so paid + held never exceeds what the sale had;
- only a paid order is refunded (a cancelled sale's), once;
- no payment is accepted after its order's deadline plus the sale's grace, and no hold
  expires before its deadline (plus the grace while a payment is in progress);
- a payment is started only before its order's deadline.
"""

from __future__ import annotations

from typing import Any

Fact = tuple[str, dict[str, Any]]
RELEASES = ("HoldExpired", "HoldCancelled")


def check_lifecycle(sku: str, terms: dict[str, Any] | None, items: list[Fact]) -> list[str]:
    """What is wrong with one SKU's order lifecycle (``items`` in sequence order)."""
    if terms is None or not terms.get("hold_ms"):
        return [f"{sku}: {n} #{r['sequence']} in a sale without holds" for n, r in items
                if n in RELEASES or n in ("PaymentStarted", "OrderPaid")]  # fmt: skip
    grace = terms.get("pay_grace_ms") or 0
    orders: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    allocation, returned = terms["allocation"], 0  # returned: by ReturnUnits and AddUnits
    held = paid = 0  # units in each state, kept as orders move (not summed per event)
    for name, rec in items:
        where = f"{sku} #{rec['sequence']}"
        order = orders.get(rec.get("order_id", ""))
        state = None if order is None else order["state"]
        at = rec["decided_at"]
        if name == "IntentAccepted":
            orders[rec["order_id"]] = {"state": "held", "q": rec["quantity"],
                                       "pay_by": rec["pay_by"], "attempt": None}  # fmt: skip
            held += rec["quantity"]
            if rec["pay_by"] != at + terms["hold_ms"]:
                problems.append(f"{where}: held until {rec['pay_by']}, the terms say "
                                f"{at + terms['hold_ms']}")  # fmt: skip
        elif name == "UnitsReturned" or name == "UnitsAdded":
            returned += rec["quantity"]
        elif name == "OrderRefunded":
            if state != "paid" or order is None:
                problems.append(f"{where}: refunded an order {state or 'unknown'}")
            else:
                order["state"] = "refunded"
                paid -= order["q"]
        elif name == "PaymentStarted":
            if state != "held" or order is None or at >= order["pay_by"]:
                problems.append(f"{where}: a payment started for an order {state or 'unknown'}"
                                f" at {at}")  # fmt: skip
            else:
                order["attempt"] = rec["attempt_id"]
        elif name == "PaymentDeclined":
            if order is not None and order["attempt"] == rec["attempt_id"]:
                order["attempt"] = None
        elif name == "OrderPaid":
            if state != "held" or order is None:
                problems.append(f"{where}: paid an order {state or 'unknown'}")
            else:
                if order["attempt"] != rec["attempt_id"]:
                    problems.append(f"{where}: paid by {rec['attempt_id']}, never started")
                if at > order["pay_by"] + grace:
                    problems.append(f"{where}: paid at {at}, after the deadline "
                                    f"{order['pay_by']} and its grace")  # fmt: skip
                order["state"] = "paid"
                held, paid = held - order["q"], paid + order["q"]
        elif name in RELEASES:
            if state != "held" or order is None:
                problems.append(f"{where}: {name} of an order {state or 'unknown'}")
            else:
                due = order["pay_by"] + (grace if order["attempt"] else 0)
                early = at < due if order["attempt"] is None else at <= due
                if name == "HoldExpired" and early:
                    problems.append(f"{where}: expired at {at}, before its deadline {due}")
                order["state"] = "expired" if name == "HoldExpired" else "cancelled"
                held -= order["q"]
        balanced = rec.get("remaining", 0) + held + paid == allocation + returned
        if "remaining" in rec and name != "SaleOpened" and not balanced:
            problems.append(f"{where}: {rec['remaining']} remaining + {held} held + {paid} "
                            f"paid != {allocation} + {returned} added or returned")  # fmt: skip
    return problems
