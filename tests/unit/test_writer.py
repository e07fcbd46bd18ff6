"""PartitionWriter, the processor's shell without Faust: batches of bytes in, bytes out."""

from __future__ import annotations

import dataclasses

from flashsale import intent_sig
from processors.core import OpenSale, PlaceIntent, SaleTerms
from processors.writer import PartitionWriter
from producers.crowd import plan_crowd
from tests.unit.writer_fakes import (
    REGISTRY,
    InputLog,
    MemoryStore,
    assert_same_state,
    loaded,
    persist,
)

NOW = 1_800_000_000_000
TERMS = SaleTerms("s", "A", allocation=2, per_user_limit=5, per_order_max=5,
                  starts_at_ms=NOW - 1, ends_at_ms=NOW + 60_000)  # fmt: skip


def sale_log(intents: int, quantity: int = 1) -> InputLog:
    log = InputLog()
    log.add(OpenSale(TERMS), NOW)
    for i in range(intents):
        log.add(PlaceIntent(f"i{i}", f"u{i}", "s", "A", quantity), NOW)
    return log


def test_a_redelivered_intent_gets_no_second_decision_and_is_counted_as_a_repeat() -> None:
    log = sale_log(1)
    log.add(PlaceIntent("i0", "u0", "s", "A", 1), NOW + 5)
    writer = PartitionWriter(REGISTRY, 0)

    first = writer.handle_batch(log.between(0, 2), None)
    again = writer.handle_batch(log.between(2, 3), 2)

    assert len(first.events) == 2 and first.repeats == 0  # SaleOpened, the decision
    assert again.events == [] and again.repeats == 1
    assert again.writes == [], "a repeat changes no state"


def test_decisions_are_keyed_by_sku_and_encoded_as_the_registry_would() -> None:
    writer = PartitionWriter(REGISTRY, 0)
    [(_, opened), (key, value)] = writer.handle_batch(sale_log(1).records, None).events
    assert REGISTRY.decode(opened)[0] == "SaleOpened"
    name, record = REGISTRY.decode(value)
    assert key == b"A" and name == "IntentAccepted"
    assert (record["intent_id"], record["order_id"], record["remaining"]) == ("i0", "ord-i0", 1)
    assert (record["correlation_id"], record["decided_at"], record["occurred_at"]) == (
        "i0",
        NOW,
        NOW,
    )


def test_a_batch_decided_in_chunks_is_the_same_as_one_handle_batch() -> None:
    log = sale_log(6)
    whole = PartitionWriter(REGISTRY, 0).handle_batch(log.records, None)
    writer = PartitionWriter(REGISTRY, 0)
    batch = writer.open_batch()
    for start in range(0, 7, 2):
        writer.decide(batch, log.between(start, start + 2))
    writer.close_batch(batch, 0, None)
    assert (batch.events, batch.writes) == (whole.events, whole.writes)


def test_decisions_after_a_load_continue_byte_identically() -> None:
    log = sale_log(3)
    for i in (1, 9):
        log.add(PlaceIntent(f"i{i}", f"u{i}", "s", "A", 1), NOW + 1)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    persist(writer, store, log.between(0, 2))
    persist(writer, store, log.between(2, 4), committed=2)

    resumed = loaded(store, 4)
    assert_same_state(resumed.ledgers, writer.ledgers)
    tail = log.between(4, 6)
    assert resumed.handle_batch(tail, 4).events == writer.handle_batch(tail, 4).events


def test_a_rebuild_by_replay_gives_the_live_state_and_persists_it_whole() -> None:
    log = sale_log(5)
    live = PartitionWriter(REGISTRY, 0)
    live.handle_batch(log.between(0, 4), None)
    expected = live.handle_batch(log.between(4, 6), 4)

    rebuilt, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    assert rebuilt.rebuild(log.between(0, 4)) == 4
    result = persist(rebuilt, store, log.between(4, 6), committed=4)

    assert result.checkpoint, "the replayed state is written whole"
    assert result.events == expected.events
    assert_same_state(rebuilt.ledgers, live.ledgers)
    assert_same_state(loaded(store, 6).ledgers, live.ledgers)


def test_negative_quantity_is_a_rule_fault_not_a_dead_letter() -> None:
    writer = PartitionWriter(REGISTRY, 0)
    result = writer.handle_batch(sale_log(1, quantity=-2).records, None)
    assert result.dead_letters == []
    name, record = REGISTRY.decode(result.events[1][1])
    assert name == "IntentRejected" and record["reason"] == "INVALID_QUANTITY"


def test_demo_crowd_contains_its_stressors() -> None:
    plan = plan_crowd(["A", "B", "C"], intents=20_000, users=5_000)
    assert len(plan.intents) == 20_000
    assert plan.retries == sum(1 for p in plan.intents if p.retry) > 0
    assert plan.over_limit_users > 0 and plan.invalid_quantity > 0
    keys = {(p.user_id, p.idempotency_key) for p in plan.intents}
    assert len(keys) == 20_000 - plan.retries


def test_with_an_intent_key_only_signed_intents_are_decided_live_and_in_a_replay() -> None:
    key = b"k" * 32
    log = sale_log(3)  # OpenSale, then intents i0 (signed), i1 (unsigned), i2 (forged)
    good, unsigned, forged = log.records[1:4]
    log.records[1] = dataclasses.replace(good, headers=intent_sig.headers_for(good.value, key))
    log.records[3] = dataclasses.replace(
        forged, headers=intent_sig.headers_for(unsigned.value or b"", key)
    )
    live = PartitionWriter(REGISTRY, 0, key)
    result = live.handle_batch(log.records, None)
    decided = [REGISTRY.decode(v)[1].get("intent_id") for _, v in result.events[1:]]
    assert decided == ["i0"]
    # with each intent's id: its dead-letter log line can be traced
    assert [(d.offset, d.reason, d.intent_id) for d in result.dead_letters] == [
        (2, "unsigned-intent", "i1"), (3, "forged-intent", "i2"),
    ]  # fmt: skip
    rebuilt = PartitionWriter(REGISTRY, 0, key)
    assert rebuilt.rebuild(log.records) == 4
    assert_same_state(rebuilt.ledgers, live.ledgers)
    # without a key (a one-node stack) every intent counts, signed or not
    assert len(PartitionWriter(REGISTRY, 0).handle_batch(log.records, None).events) == 4
