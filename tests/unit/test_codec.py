"""Single-object codec: round trips, fingerprints, bad input, schema evolution."""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.core import (
    DrawRevealed,
    EntryQueued,
    Event,
    HoldCancelled,
    HoldExpired,
    IntentAccepted,
    IntentDeferred,
    IntentRejected,
    OrderPaid,
    OrderRefunded,
    OrderRefused,
    PaymentDeclined,
    PaymentStarted,
    PaymentVoided,
    QueueExpired,
    QueueKind,
    QueueProgress,
    RejectionReason,
    SaleCancelled,
    SaleClosed,
    SaleOpened,
    SalePaused,
    SaleRefused,
    SaleResumed,
    SaleSettled,
    SaleTerms,
    UnitsAdded,
    UnitsReturned,
    Waitlisted,
)
from processors.records import event_from_record, to_record
from schemas import SCHEMA_DIR
from schemas.codec import (
    MAGIC,
    SchemaRegistry,
    SchemaViolation,
    UndecodableRecord,
    decode,
    default_registry,
    encode,
    schema_fingerprint,
)

ENVELOPE = {"event_id": "e-1", "correlation_id": "i-1", "producer": "test", "occurred_at": 17}
DECISIONS: list[IntentAccepted | IntentRejected] = [
    IntentAccepted("i-1", "s-1", "SKU", "u-1", 2, "ord-i-1", 3, 7, 1_700_000_000_000),
    IntentRejected(
        "i-2",
        "s-1",
        "SKU",
        "u-2",
        9,
        RejectionReason.ORDER_MAX_EXCEEDED,
        "9 > 2",
        3,
        8,
        1_700_000_000_001,
    ),
    IntentAccepted("i-3", "s-2", "SKU", "u-3", 1, "ord-i-3", 2, 9, 1_700_000_000_009, 4, 70),
    IntentAccepted(
        "i-9", "s-3", "SKU", "u-9", 2, "ord-i-9", 2, 2, 1_700_000_000_009, pay_by=1_700_000_600_009
    ),
    IntentRejected(
        "i-4", "s-2", "SKU", "u-4", 1, RejectionReason.DRAW_NOT_REVEALED, "ended", 2, 10, 17
    ),
]
TERMS = SaleTerms("s-1", "SKU", 100, 2, 1, 1, 2**42, rules=1)
QUEUED_TERMS = SaleTerms("s-2", "SKU", 100, 2, 1, 50, 2**42, 1, 10, "ab" * 32, 500)
FACTS: list[Event] = [
    SaleOpened(TERMS, 1, 1_700_000_000_000),
    SaleOpened(QUEUED_TERMS, 1, 1_700_000_000_000),
    EntryQueued("i-5", "s-2", "SKU", "u-5", 1, QueueKind.REPEAT, 3, 4, 5, 1_700_000_000_006),
    DrawRevealed("s-2", "SKU", "cd" * 32, 3, "ef" * 32, 6, 1_700_000_000_007),
    QueueExpired("s-2", "SKU", 3, 4, 6, 1_700_000_000_008),
    SaleRefused("s-1", "SKU", "SettleSale", "sale still open", 9, 1_700_000_000_002),
    SaleClosed("s-1", "SKU", 3, 10, 1_700_000_000_003),
    UnitsReturned("s-1", "SKU", "hold-1", 3, 1, 4, 11, 1_700_000_000_004),
    SaleSettled("s-1", "SKU", 2, 4, 12, 1_700_000_000_005),
    PaymentStarted("s-3", "SKU", "ord-i-9", "a-1", "u-9", 1_700_000_600_000, 3, 1_700_000_000_010),
    OrderRefused("s-3", "SKU", "ord-i-9", "StartPayment", "a-2", "payment a-1 is in progress",
                 4, 1_700_000_000_011),
    PaymentDeclined("s-3", "SKU", "ord-i-9", "a-1", 5, 1_700_000_000_012),
    OrderPaid("s-3", "SKU", "ord-i-9", "a-3", "u-9", 2, 6, 1_700_000_000_013),
    PaymentVoided("s-3", "SKU", "ord-i-8", "a-4", "the order is expired", 7, 1_700_000_000_014),
    HoldExpired("s-3", "SKU", "ord-i-8", "u-8", 1, 5, 8, 1_700_000_000_015),
    HoldCancelled("s-3", "SKU", "ord-i-7", "u-7", 1, 6, 9, 1_700_000_000_016),
    Waitlisted("i-6", "s-3", "SKU", "u-6", 1, 3, 10, 1_700_000_000_017),
    SalePaused("s-3", "SKU", 4, 11, 1_700_000_000_018),
    IntentDeferred("i-7", "s-3", "SKU", "u-7", 2, 1, 12, 1_700_000_000_019),
    SaleResumed("s-3", "SKU", 1, 13, 1_700_000_000_020),
    UnitsAdded("s-3", "SKU", "add-1", 5, 105, 9, 14, 1_700_000_000_021),
    SaleCancelled("s-3", "SKU", "mispriced", 9, 15, 1_700_000_000_022),
    OrderRefunded("s-3", "SKU", "ord-i-9", "a-3", "u-9", 2, 11, 16, 1_700_000_000_023),
]  # fmt: skip
SAMPLES: dict[str, dict[str, Any]] = {
    "OpenSale": {
        "sale_id": "s-1",
        "sku": "SKU",
        "allocation": 100,
        "per_user_limit": 2,
        "per_order_max": 1,
        "starts_at": 1,
        "ends_at": 2**42,
        "rules_version": None,
        "prequeue_opens_at": 0,
        "draw_commitment": "ab" * 32,
        "progress_every": 100,
        "hold_ms": 600_000,
        "pay_grace_ms": 30_000,
        "waitlist_depth": 50,
    },
    "StartPayment": {
        "sale_id": "s-3",
        "sku": "SKU",
        "order_id": "ord-i-9",
        "user_id": "u-9",
        "attempt_id": "a-1",
    },
    "RecordPayment": {
        "sale_id": "s-3",
        "sku": "SKU",
        "order_id": "ord-i-9",
        "attempt_id": "a-1",
        "succeeded": True,
    },
    "CancelHold": {"sale_id": "s-3", "sku": "SKU", "order_id": "ord-i-9", "user_id": "u-9"},
    "CloseSale": {"sale_id": "s-1", "sku": "SKU", "reason": "ops"},
    "PauseSale": {"sale_id": "s-1", "sku": "SKU"},
    "ResumeSale": {"sale_id": "s-1", "sku": "SKU"},
    "AddUnits": {"sale_id": "s-1", "sku": "SKU", "quantity": 5, "ref": "add-1"},
    "CancelSale": {"sale_id": "s-1", "sku": "SKU", "reason": "mispriced"},
    "SettleSale": {"sale_id": "s-1", "sku": "SKU"},
    "ReturnUnits": {"sale_id": "s-1", "sku": "SKU", "quantity": 2, "ref": "hold-1"},
    "PurchaseIntent": {
        "intent_id": "i-1",
        "idempotency_key": "k",
        "user_id": "u-1",
        "sale_id": "s-1",
        "sku": "SKU",
        "quantity": -3,
    },
    "RevealDraw": {"sale_id": "s-2", "sku": "SKU", "seed": "cd" * 32},
    "ClockTick": {"partition": 3},
    "IntentAccepted": to_record(DECISIONS[0]),
    "IntentRejected": to_record(DECISIONS[1]),
    **{type(e).__name__: to_record(e) for e in FACTS},
    "QueueProgress": to_record(QueueProgress("s-2", "SKU", 500, 0, True, 3, 123_456, 17)),
}


def current(name: str) -> dict[str, Any]:
    return dict(json.loads((SCHEMA_DIR / f"{name}.avsc").read_text()))


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification's reference code computes it."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_every_schema_is_registered_and_has_the_envelope_first() -> None:
    registry = SchemaRegistry.load_default()
    assert registry.names() == sorted(SAMPLES)
    for name in SAMPLES:
        fields = [f["name"] for f in registry.schema(name)["fields"]]
        assert fields[:4] == ["event_id", "correlation_id", "producer", "occurred_at"]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(name: str) -> None:
    record = {**ENVELOPE, **SAMPLES[name]}
    data = encode(name, record)
    assert data[:2] == MAGIC
    assert decode(data) == (name, record)


def test_every_event_survives_records_and_codec() -> None:
    for event in [*DECISIONS, *FACTS]:
        name, record = decode(encode(type(event).__name__, {**ENVELOPE, **to_record(event)}))
        assert event_from_record(name, record) == event


def test_fingerprint_matches_the_spec_algorithm_little_endian() -> None:
    # Known vector from Avro's own test suite: the schema "int".
    assert crc64_avro(b'"int"') == 8247732601305521295
    assert schema_fingerprint("int") == struct.pack("<Q", 8247732601305521295)
    for name in SAMPLES:
        canonical = to_parsing_canonical_form(current(name)).encode()
        expected = struct.pack("<Q", crc64_avro(canonical))
        assert schema_fingerprint(current(name)) == expected
        assert encode(name, {**ENVELOPE, **SAMPLES[name]})[2:10] == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad-magic"),
        (b"\x00\x01" + b"\x00" * 20, "bad-magic"),
        (MAGIC + b"\x00" * 8 + b"\x02a", "unknown-fingerprint"),
    ],
)
def test_bad_input_is_named(data: bytes, reason: str) -> None:
    with pytest.raises(UndecodableRecord) as info:
        decode(data)
    assert info.value.reason == reason


def test_truncated_or_padded_body_is_corrupt() -> None:
    data = encode("PurchaseIntent", {**ENVELOPE, **SAMPLES["PurchaseIntent"]})
    for cut in [*range(10, len(data)), None]:
        broken = data[:cut] if cut is not None else data + b"\x00"
        with pytest.raises(UndecodableRecord) as info:
            decode(broken)
        assert info.value.reason == "truncated-or-corrupt"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(sorted(SAMPLES)), st.booleans())
def test_random_bytes_never_escape_as_other_errors(body: bytes, name: str, framed: bool) -> None:
    data = MAGIC + default_registry().fingerprint(name) + body if framed else body
    try:
        decoded_name, record = decode(data)
    except UndecodableRecord as exc:
        assert exc.reason in {"bad-magic", "unknown-fingerprint", "truncated-or-corrupt"}
    else:
        assert decoded_name == name and isinstance(record, dict)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quantity": "2"}, "quantity"),
        ({"quantity": 2.5}, "quantity"),
        ({"quantity": True}, "quantity"),
        ({"quantity": 2**31}, "quantity"),
        ({"sku": None}, "sku"),
        ({"occurred_at": "now"}, "occurred_at"),
    ],
)
def test_encoding_a_bad_record_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SchemaViolation) as info:
        encode("PurchaseIntent", {**ENVELOPE, **SAMPLES["PurchaseIntent"], **change})
    assert info.value.reason == "schema-violation" and info.value.field == field


def test_missing_field_is_a_schema_violation() -> None:
    record = {**ENVELOPE, **SAMPLES["PurchaseIntent"]}
    del record["user_id"]
    with pytest.raises(SchemaViolation) as info:
        encode("PurchaseIntent", record)
    assert info.value.field == "user_id"


def with_extra_field(schema: dict[str, Any]) -> dict[str, Any]:
    newer = copy.deepcopy(schema)
    newer["fields"].append({"name": "channel", "type": "string", "default": "web"})
    return newer


def test_old_reader_new_writer_drops_the_added_field() -> None:
    registry = SchemaRegistry.load_default()
    newer = registry.register(with_extra_field(current("PurchaseIntent")))
    record = {**ENVELOPE, **SAMPLES["PurchaseIntent"]}
    data = registry.encode_as(newer, {**record, "channel": "app"})
    assert data[2:10] == newer != registry.fingerprint("PurchaseIntent")
    assert registry.decode(data) == ("PurchaseIntent", record)


def test_new_reader_old_writer_fills_the_default() -> None:
    registry = SchemaRegistry()
    old = registry.register(current("PurchaseIntent"))
    registry.register(with_extra_field(current("PurchaseIntent")), current=True)
    record = {**ENVELOPE, **SAMPLES["PurchaseIntent"]}
    data = SchemaRegistry.load_default().encode("PurchaseIntent", record)
    assert data[2:10] == old
    assert registry.decode(data) == ("PurchaseIntent", {**record, "channel": "web"})


def test_unknown_rejection_reason_reads_as_unspecified() -> None:
    registry = SchemaRegistry.load_default()
    newer = current("IntentRejected")
    reason_type = next(f["type"] for f in newer["fields"] if f["name"] == "reason")
    reason_type["symbols"].append("FRAUD_SUSPECTED")
    fp = registry.register(newer)
    data = registry.encode_as(
        fp, {**ENVELOPE, **SAMPLES["IntentRejected"], "reason": "FRAUD_SUSPECTED"}
    )
    name, record = registry.decode(data)
    assert (name, record["reason"]) == ("IntentRejected", "UNSPECIFIED")
    assert event_from_record(name, record).reason is RejectionReason.UNSPECIFIED  # type: ignore[union-attr]


def test_records_of_every_earlier_schema_version_still_decode() -> None:
    """Topics are kept forever: each version kept in ``schemas/history`` is still read, and
    what the current version added comes back as its default."""
    registry = SchemaRegistry.load_default()
    kept = sorted((SCHEMA_DIR / "history").glob("*.avsc"))
    assert kept, "schemas/history holds the versions that were current before"
    for path in kept:
        old = json.loads(path.read_text())
        name = old["name"]
        fp = schema_fingerprint(old)
        assert path.name == f"{name}.{fp.hex()}.avsc"
        assert fp != registry.fingerprint(name)
        fields = {f["name"] for f in old["fields"]}
        record = {k: v for k, v in {**ENVELOPE, **SAMPLES[name]}.items() if k in fields}
        got_name, got = registry.decode(registry.encode_as(fp, record))
        now = current(name)["fields"]
        added = {f["name"]: f["default"] for f in now if f["name"] not in fields}
        assert (got_name, got) == (name, {**record, **added})
