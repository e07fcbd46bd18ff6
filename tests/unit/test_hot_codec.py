"""The hot-path decision encoder writes exactly the bytes the schema registry writes."""

from __future__ import annotations

import copy
import dataclasses
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.core import IntentAccepted, IntentRejected, RejectionReason
from processors.hot_codec import DecisionEncoder
from processors.records import event_from_record, record_name, to_record
from producers.identity import (
    DECISIONS_NAMESPACE,
    INTENTS_NAMESPACE,
    decision_event_id,
    intent_id_for,
    random_event_id,
)
from schemas.codec import SchemaRegistry

REGISTRY = SchemaRegistry.load_default()
PRODUCER = "flashsale-inventory"
INT = st.integers(-(2**31), 2**31 - 1)
LONG = st.integers(-(2**63), 2**63 - 1)
# Any text: empty, non-ASCII, and longer than 64 bytes (a multi-byte varint length).
TEXT = st.text(max_size=8) | st.text(min_size=33, max_size=200) | st.sampled_from(["é" * 40])


def registry_bytes(registry: SchemaRegistry, event: IntentAccepted | IntentRejected) -> bytes:
    """What ``SchemaRegistry.encode`` makes of ``event`` with the writer's envelope."""
    envelope = {
        "event_id": str(uuid.uuid5(DECISIONS_NAMESPACE, event.intent_id)),
        "correlation_id": event.intent_id,
        "producer": PRODUCER,
        "occurred_at": event.decided_at,
    }
    return registry.encode(record_name(event), {**envelope, **to_record(event)})


accepted = st.builds(IntentAccepted, intent_id=TEXT, sale_id=TEXT, sku=TEXT, user_id=TEXT,
                     quantity=INT, order_id=TEXT, remaining=INT, sequence=LONG,
                     decided_at=LONG, draw_rank=INT, draw_size=INT, pay_by=LONG)  # fmt: skip
rejected = st.builds(IntentRejected, intent_id=TEXT, sale_id=TEXT, sku=TEXT, user_id=TEXT,
                     quantity=INT, reason=st.sampled_from(RejectionReason), detail=TEXT,
                     remaining=INT, sequence=LONG, decided_at=LONG, draw_rank=INT,
                     draw_size=INT)  # fmt: skip
decisions = st.one_of(accepted, rejected)

# One encoder for all examples: it caches the last decided_at, which must never leak.
SHARED = DecisionEncoder(REGISTRY, PRODUCER)


@settings(max_examples=500, deadline=None)
@given(decisions)
def test_hot_encoding_is_byte_identical_to_the_registry(
    event: IntentAccepted | IntentRejected,
) -> None:
    expected = registry_bytes(REGISTRY, event)
    assert SHARED.encode(event) == expected
    assert DecisionEncoder(REGISTRY, PRODUCER).encode(event) == expected
    name, record = REGISTRY.decode(expected)
    assert event_from_record(name, record) == event


@settings(max_examples=100, deadline=None)
@given(st.lists(decisions, min_size=2, max_size=6), LONG)
def test_decisions_sharing_a_log_time_encode_as_if_alone(
    events: list[IntentAccepted | IntentRejected], at: int
) -> None:
    encoder = DecisionEncoder(REGISTRY, PRODUCER)
    for event in events:
        at_once = dataclasses.replace(event, decided_at=at)
        assert encoder.encode(at_once) == registry_bytes(REGISTRY, at_once)


def test_every_rejection_reason_follows_the_schemas_symbol_order() -> None:
    # Reorder the enum in a registered "current" schema: the encoder must follow the schema,
    # not the order of RejectionReason.
    schema = copy.deepcopy(REGISTRY.schema("IntentRejected"))
    reason = next(f for f in schema["fields"] if f["name"] == "reason")
    reason["type"]["symbols"] = list(reversed(reason["type"]["symbols"]))
    registry = SchemaRegistry.load_default()
    registry.register(schema, current=True)
    encoder = DecisionEncoder(registry, PRODUCER)
    for why in RejectionReason:
        event = IntentRejected("i", "s", "A", "u", 1, why, "d", 0, 1, 2)
        assert encoder.encode(event) == registry_bytes(registry, event)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_event_id_is_the_uuid5_of_the_intent_id(intent_id: str) -> None:
    assert decision_event_id(intent_id) == str(uuid.uuid5(DECISIONS_NAMESPACE, intent_id))


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT, TEXT, TEXT)
def test_intent_id_is_the_uuid5_of_user_sale_sku_and_key(u: str, s: str, k: str, key: str) -> None:
    name = f"{u}\x1f{s}\x1f{k}\x1f{key}"
    assert intent_id_for(u, s, k, key) == uuid.uuid5(INTENTS_NAMESPACE, name).hex


def test_random_event_ids_are_version_4_uuids_as_uuid4_writes_them() -> None:
    ids = [random_event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for i in ids:
        parsed = uuid.UUID(i)
        assert str(parsed) == i and parsed.version == 4 and parsed.variant == uuid.RFC_4122
