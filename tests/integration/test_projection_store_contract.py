"""The outcomes projection's store contract: in memory and PostgreSQL pass the same cases.

PostgreSQL runs in a scratch schema of its own (dropped afterwards). Each case states the
tables it expects by hand, so both adapters are held to the same figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from infra.stack import Endpoints
from projections import schema, store
from projections.memory import MemoryOutcomeStore
from projections.rows import BatchRows

T = 1_760_000_000_000
Dump = dict[str, list[tuple[Any, ...]]]


class Adapter:
    def __init__(self, write: Callable[[BatchRows], int], dump: Callable[[], Dump]) -> None:
        self.write, self.dump = write, dump


@pytest.fixture(params=["memory", "postgres"])
def adapter(request: pytest.FixtureRequest, endpoints: Endpoints, uid: str) -> Iterator[Adapter]:
    if request.param == "memory":
        memory = MemoryOutcomeStore()
        yield Adapter(memory.write, memory.dump)
        return
    scratch = f"contract_{uid}"
    schema.create(endpoints.dsn, scratch)
    try:
        with psycopg.connect(endpoints.dsn, autocommit=True) as conn:
            conn.execute("SELECT set_config('search_path', %s, false)", (scratch,))

            def write(rows: BatchRows) -> int:
                with conn.transaction():
                    return store.write(conn, rows)

            yield Adapter(write, lambda: store.dump(conn))
    finally:
        schema.drop(endpoints.dsn, scratch)


def at(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, UTC)


def opened(sale: str, sku: str, allocation: int, seq: int = 1) -> dict:
    return {"event_id": f"open-{sku}", "sale_id": sale, "sku": sku, "allocation": allocation,
            "per_user_limit": 2, "per_order_max": 2, "starts_at": T, "ends_at": T + 60_000,
            "rules_version": 1, "sequence": seq, "decided_at": T}  # fmt: skip


def decision(intent: str, seq: int, remaining: int, *, q: int = 1, reason: str | None = None,
             user: str = "u1", sku: str = "A", drawn: tuple[int, int] = (0, 0),
             ) -> tuple[str, dict]:  # fmt: skip
    record = {"intent_id": intent, "sale_id": "s", "sku": sku, "user_id": user, "quantity": q,
              "remaining": remaining, "sequence": seq, "decided_at": T + seq,
              "draw_rank": drawn[0], "draw_size": drawn[1]}  # fmt: skip
    if reason is None:
        return "IntentAccepted", {**record, "order_id": f"ord-{intent}"}
    return "IntentRejected", {**record, "reason": reason, "detail": reason.lower()}


def batch(*items: tuple[str, dict]) -> BatchRows:
    rows = BatchRows()
    for name, record in items:
        rows.add(name, record)
    return rows


def test_a_batch_projects_outcomes_orders_and_counters_from_the_allocation(adapter: Adapter):
    assert adapter.write(batch(("SaleOpened", opened("s", "A", 5)))) == 0
    assert (
        adapter.write(
            batch(
                decision("i1", 2, 3, q=2), decision("i2", 3, 3, reason="USER_LIMIT", drawn=(7, 9))
            )
        )
        == 2
    )
    got = adapter.dump()
    assert got["sales"] == [("s", "A", 5, 2, 2, at(T), at(T + 60_000), False, "open-A", None)]
    assert got["orders"] == [("ord-i1", "i1", "s", "A", "u1", 2, at(T + 2), 2, "confirmed", None)]
    assert got["intent_outcomes"] == [
        ("i1", "s", "A", "u1", 2, "accepted", None, "", "ord-i1", 3, 2, at(T + 2), None, None),
        ("i2", "s", "A", "u1", 1, "rejected", "USER_LIMIT", "user_limit", None, 3, 3, at(T + 3),
         7, 9),
    ]  # fmt: skip
    assert got["sale_counters"] == [("s", "A", 1, 2, 1, {"USER_LIMIT": 1}, 3, 3)]


def test_a_decision_seen_again_in_a_later_batch_counts_once(adapter: Adapter):
    adapter.write(batch(("SaleOpened", opened("s", "A", 5)), decision("i1", 2, 4)))
    # i1 again (a redelivery) next to a new decision: only i2 is new.
    assert adapter.write(batch(decision("i1", 2, 4), decision("i2", 3, 3))) == 1
    assert adapter.write(batch(decision("i2", 3, 3))) == 0
    got = adapter.dump()
    assert [o[0] for o in got["orders"]] == ["ord-i1", "ord-i2"]
    assert got["sale_counters"] == [("s", "A", 2, 2, 0, {}, 3, 3)]


def test_counters_follow_the_greatest_sequence_whatever_the_batch_order(adapter: Adapter):
    adapter.write(
        batch(decision("i3", 4, 0, reason="SOLD_OUT"), decision("i4", 5, 0, reason="SOLD_OUT"))
    )
    adapter.write(batch(decision("i1", 2, 1), decision("i2", 3, 0, reason="USER_LIMIT")))
    adapter.write(batch(("SaleOpened", opened("s", "A", 2))))  # the terms arrive last
    got = adapter.dump()
    assert got["sale_counters"] == [("s", "A", 1, 1, 3, {"SOLD_OUT": 2, "USER_LIMIT": 1}, 0, 5)]


def test_returned_units_and_closing_carry_the_remaining_count(adapter: Adapter):
    returned = {"sale_id": "s", "sku": "A", "ref": "hold-1", "requested": 1, "quantity": 1,
                "remaining": 4, "sequence": 4, "decided_at": T + 4}  # fmt: skip
    closed = {"sale_id": "s", "sku": "A", "remaining": 4, "sequence": 5, "decided_at": T + 5}
    adapter.write(batch(("SaleOpened", opened("s", "A", 5)), decision("i1", 2, 3, q=2)))
    adapter.write(batch(("UnitsReturned", returned), decision("i2", 3, 3, reason="USER_LIMIT")))
    assert adapter.dump()["sale_counters"] == [("s", "A", 1, 2, 1, {"USER_LIMIT": 1}, 4, 4)]
    adapter.write(batch(("SaleClosed", closed)))
    got = adapter.dump()
    assert got["sale_counters"] == [("s", "A", 1, 2, 1, {"USER_LIMIT": 1}, 4, 5)]
    assert [s[7] for s in got["sales"]] == [True]


def test_closing_marks_the_sale_and_an_unknown_sale_is_left_alone(adapter: Adapter):
    adapter.write(batch(("SaleOpened", opened("s", "A", 1)), ("SaleOpened", opened("s", "B", 1))))
    rows = batch()
    rows.closures += [("s", "A"), ("s", "nope")]
    adapter.write(rows)
    assert [(s[1], s[7]) for s in adapter.dump()["sales"]] == [("A", True), ("B", False)]


def test_text_with_tabs_newlines_and_backslashes_round_trips(adapter: Adapter):
    user = "a\tb\\c\nd\re"
    adapter.write(batch(decision("i1", 1, 0, user=user, sku="K\t1")))
    got = adapter.dump()
    assert got["orders"][0][3:5] == ("K\t1", user)
    assert got["intent_outcomes"][0][2:4] == ("K\t1", user)


def test_rejections_before_the_sale_opened_leave_its_allocation(adapter: Adapter):
    # UNKNOWN_SALE says remaining 0; the opening comes after them in the sale's numbering.
    early = [decision(f"i{n}", n, 0, reason="UNKNOWN_SALE") for n in (1, 2)]
    adapter.write(batch(*early))
    adapter.write(batch(("SaleOpened", opened("s", "A", 5, seq=3))))
    assert adapter.dump()["sale_counters"] == [("s", "A", 0, 0, 2, {"UNKNOWN_SALE": 2}, 5, 3)]
    adapter.write(batch(decision("i3", 4, 4)))
    assert adapter.dump()["sale_counters"] == [("s", "A", 1, 1, 2, {"UNKNOWN_SALE": 2}, 4, 4)]


def test_rejections_before_the_opening_in_the_same_batch_leave_its_allocation(adapter: Adapter):
    adapter.write(
        batch(
            ("SaleOpened", opened("s", "A", 5, seq=2)), decision("i1", 1, 0, reason="UNKNOWN_SALE")
        )
    )
    assert adapter.dump()["sale_counters"] == [("s", "A", 0, 0, 1, {"UNKNOWN_SALE": 1}, 5, 2)]


def fact(name: str, seq: int, **fields: Any) -> tuple[str, dict]:
    return name, {"sale_id": "s", "sku": "A", "sequence": seq, "decided_at": T + seq, **fields}


def test_order_status_follows_its_lifecycle_facts_once_each(adapter: Adapter):
    held = {**opened("s", "A", 5), "hold_ms": 60_000}
    adapter.write(batch(("SaleOpened", held), decision("i1", 2, 4), decision("i2", 3, 3),
                        decision("i3", 4, 2)))  # fmt: skip
    paying = [
        fact("PaymentStarted", 5, order_id="ord-i1", attempt_id="a1", user_id="u1", pay_by=0),
        fact("OrderPaid", 6, order_id="ord-i1", attempt_id="a1", user_id="u1", quantity=1),
        fact("PaymentStarted", 7, order_id="ord-i2", attempt_id="a2", user_id="u1", pay_by=0),
        fact("PaymentDeclined", 8, order_id="ord-i2", attempt_id="a2"),
        fact("HoldExpired", 9, order_id="ord-i3", user_id="u1", quantity=1, remaining=3),
        fact("PaymentStarted", 10, order_id="ord-i2", attempt_id="a3", user_id="u1", pay_by=0),
    ]
    adapter.write(batch(*paying[:4]))
    adapter.write(batch(*paying[2:]))  # two facts again: each is kept once
    status = {o[0]: (o[8], o[9]) for o in adapter.dump()["orders"]}
    assert status == {"ord-i1": ("paid", at(T + 2 + 60_000)),
                      "ord-i2": ("paying", at(T + 3 + 60_000)),
                      "ord-i3": ("expired", at(T + 4 + 60_000))}  # fmt: skip
    adapter.write(batch(
        fact("SaleCancelled", 11, reason="mispriced", remaining=3),
        fact("HoldCancelled", 12, order_id="ord-i2", user_id="u1", quantity=1, remaining=4),
        fact("OrderRefunded", 13, order_id="ord-i1", attempt_id="a1", user_id="u1", quantity=1,
             remaining=5),
        fact("PaymentDeclined", 14, order_id="ord-i2", attempt_id="a3"),  # after the release
    ))  # fmt: skip
    got = adapter.dump()
    assert {o[0]: o[8] for o in got["orders"]} == {
        "ord-i1": "refunded", "ord-i2": "cancelled", "ord-i3": "expired"}  # fmt: skip
    assert len(got["lifecycle_events"]) == 10
    assert got["lifecycle_events"][6][3:] == ("SaleCancelled", None, None, None, None, None,
                                              "mispriced", at(T + 11))  # fmt: skip
    assert got["sale_counters"][0][6:] == (5, 13) and got["sales"][0][7] is True
