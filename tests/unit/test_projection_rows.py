"""Pure row mapping of the Postgres projection."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from projections.rows import (
    BatchRows,
    counter_rows,
    outcome_row,
    outcomes_copy,
    sale_row,
    utc,
)

ENVELOPE = {"event_id": "e1", "correlation_id": None, "producer": "t", "occurred_at": 1}


def accepted(intent: str, seq: int, **kw: object) -> dict:
    r: dict[str, object] = {
        **ENVELOPE,
        "intent_id": intent,
        "sale_id": "s1",
        "sku": "k1",
        "user_id": "u1",
        "quantity": 2,
        "order_id": f"o-{intent}",
        "remaining": 8,
        "sequence": seq,
        "decided_at": 1_700_000_000_123,
    }
    r.update(kw)
    return r


def rejected(intent: str, seq: int) -> dict:
    r = accepted(intent, seq)
    del r["order_id"]
    return {**r, "reason": "USER_LIMIT", "detail": "limit 2"}


def test_utc_keeps_milliseconds():
    assert utc(1_700_000_000_123) == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert utc(0) == datetime(1970, 1, 1, tzinfo=UTC)


def test_accepted_outcome_carries_its_order():
    row = outcome_row("IntentAccepted", accepted("i1", 3))
    assert row == (
        "i1", "s1", "k1", "u1", 2, "accepted", None, "", "o-i1", 8, 3, 1_700_000_000_123, None,
        None,
    )  # fmt: skip
    drawn = outcome_row("IntentAccepted", accepted("i1", 3, draw_rank=4, draw_size=70))
    assert drawn[12:] == (4, 70)


def test_rejected_outcome_has_reason_and_no_order():
    row = outcome_row("IntentRejected", rejected("i2", 4))
    assert row[5:9] == ("rejected", "USER_LIMIT", "limit 2", None)


def test_non_decision_is_refused():
    with pytest.raises(ValueError, match="not a decision"):
        outcome_row("SaleOpened", {})


def test_sale_row():
    record = {
        **ENVELOPE,
        "sale_id": "s1",
        "sku": "k1",
        "allocation": 10,
        "per_user_limit": 2,
        "per_order_max": 2,
        "starts_at": 1000,
        "ends_at": 2000,
    }
    assert sale_row(record) == ("s1", "k1", 10, 2, 2, utc(1000), utc(2000), "e1", None)
    assert sale_row({**record, "hold_ms": 600_000})[8] == 600_000


def test_batch_keeps_first_decision_per_intent_and_skips_intents():
    batch = BatchRows()
    assert batch.add("IntentAccepted", accepted("i1", 1))
    assert batch.add("IntentAccepted", accepted("i1", 1, event_id="e2"))  # redelivery
    assert batch.add("IntentRejected", rejected("i2", 2))
    assert not batch.add("PurchaseIntent", {"sale_id": "s1", "intent_id": "i3"})
    closed = {**ENVELOPE, "sale_id": "s1", "sku": "k1", "remaining": 4, "sequence": 9}
    assert batch.add("SaleClosed", closed)
    assert list(batch.outcomes) == ["i1", "i2"]
    assert batch.outcomes["i1"] == outcome_row("IntentAccepted", accepted("i1", 1))
    assert batch.closures == [("s1", "k1")] and batch.marks == [("s1", "k1", 4, 9)]
    assert len(batch) == 3 and batch.skipped == 1


def test_batch_filters_other_sales():
    batch = BatchRows(only_sales={"s2"})
    assert not batch.add("IntentAccepted", accepted("i1", 1))
    assert batch.add("IntentAccepted", accepted("i2", 1, sale_id="s2"))
    assert list(batch.outcomes) == ["i2"] and batch.skipped == 1


def test_copy_text_escapes_and_stamps_exactly():
    row = outcome_row("IntentRejected", {**rejected("i\t3", 5), "user_id": "a\\b\nc"})
    assert outcomes_copy([row]) == (
        "i\\t3\ts1\tk1\ta\\\\b\\nc\t2\trejected\tUSER_LIMIT\tlimit 2\t\\N\t8\t5"
        "\t2023-11-14 22:13:20.123+00\t\\N\t\\N\n"
    )
    row = outcome_row("IntentAccepted", accepted("i4", 6, decided_at=7, draw_rank=2, draw_size=9))
    assert outcomes_copy([row]) == (
        "i4\ts1\tk1\tu1\t2\taccepted\t\\N\t\to-i4\t8\t6\t1970-01-01 00:00:00.007+00\t2\t9\n"
    )


def test_prepared_is_made_once_from_every_outcome_and_mark():
    batch = BatchRows()
    batch.add("IntentAccepted", accepted("i1", 1))
    batch.add("IntentRejected", rejected("i2", 2))
    batch.add(
        "SaleClosed", {**ENVELOPE, "sale_id": "s1", "sku": "k1", "remaining": 4, "sequence": 9}
    )
    prepared = batch.prepared()
    assert prepared is batch.prepared()
    assert prepared.outcomes_text == outcomes_copy(batch.outcomes.values())
    assert prepared.counters == counter_rows(batch.outcomes.values(), batch.marks)
    assert prepared.counters == [("s1", "k1", 1, 2, 1, {"USER_LIMIT": 1}, 4, 9)]


def test_counters_follow_the_greatest_sequence_and_count_reasons():
    rows = [
        outcome_row("IntentAccepted", accepted("a", 2, remaining=5)),
        outcome_row("IntentRejected", rejected("b", 3)),
        outcome_row("IntentAccepted", accepted("c", 1, remaining=7)),
    ]
    assert counter_rows(rows) == [("s1", "k1", 2, 4, 1, {"USER_LIMIT": 1}, 8, 3)]


def test_prepared_is_made_again_after_a_row_is_added():
    batch = BatchRows()
    batch.add("IntentAccepted", accepted("i1", 1))
    first = batch.prepared()
    batch.add("IntentAccepted", accepted("i2", 2))
    assert batch.prepared() is not first
    assert batch.prepared().outcomes_text == outcomes_copy(batch.outcomes.values())
    assert batch.prepared().counters[0][2] == 2  # both accepted intents counted
