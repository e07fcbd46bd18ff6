"""The writer's hot-path encoder of decision records: byte-identical to the schema registry's.

Why hand-written: fastavro's ``schemaless_writer`` plus building the record dict costs
~12 µs a decision and ``uuid.uuid5`` ~6 µs; this encoder does both in ~6 µs. The two
decision schemas are flat records of strings and longs, whose Avro binary form is short to
write by hand. (Reading is left to fastavro: a hand-written Python reader measured 12.5 µs a
PurchaseIntent against fastavro's 7.9 µs.) The unit tests check every byte against
``SchemaRegistry.encode`` and ``uuid.uuid5`` (hypothesis), so a schema change that this
module does not follow fails there, not in production.
"""

from __future__ import annotations

from typing import Any

from processors.core import IntentAccepted, IntentRejected, RejectionReason
from producers.identity import decision_event_id
from schemas.codec import SchemaRegistry

_ONE_BYTE = [bytes((n << 1,)) for n in range(64)]  # 0..63 zigzag to a single byte


def _long(n: int) -> bytes:
    """Avro long: zigzag, then little-endian base-128 varint."""
    if 0 <= n < 64:
        return _ONE_BYTE[n]
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return bytes((z,))
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    return (_ONE_BYTE[n] if n < 64 else _long(n)) + b


class DecisionEncoder:
    """Encodes IntentAccepted / IntentRejected with the registry's current schemas."""

    def __init__(self, registry: SchemaRegistry, producer: str) -> None:
        self._accepted = b"\xc3\x01" + registry.fingerprint("IntentAccepted")
        self._rejected = b"\xc3\x01" + registry.fingerprint("IntentRejected")
        symbols = _enum_symbols(registry.schema("IntentRejected"), "reason")
        self._reasons = {RejectionReason(s): _long(i) for i, s in enumerate(symbols)}
        self._producer = _str(producer)
        self._at: tuple[int, bytes] = (0, _long(0))  # a batch shares few log times
        self._where: tuple[str, str, bytes] = ("", "", _str("") + _str(""))  # and sale, SKU

    def encode(self, event: IntentAccepted | IntentRejected) -> bytes:
        """Single-object encoding with envelope (event id, correlation id, producer, time)."""
        intent = _str(event.intent_id)
        if self._at[0] == event.decided_at:
            at = self._at[1]
        else:
            at = _long(event.decided_at)
            self._at = (event.decided_at, at)
        where = self._where
        if where[0] != event.sale_id or where[1] != event.sku:
            where = self._where = (event.sale_id, event.sku, _str(event.sale_id) + _str(event.sku))
        eid = _str(decision_event_id(event.intent_id))
        common = (
            eid + b"\x02" + intent + self._producer + at + intent
            + where[2] + _str(event.user_id) + _long(event.quantity)
        )  # fmt: skip
        rank, size = event.draw_rank, event.draw_size
        drawn = _long(rank) + _long(size) if rank or size else b"\x00\x00"  # not drawn: 0, 0
        if type(event) is IntentAccepted:
            return b"".join((self._accepted, common, _str(event.order_id),
                             _long(event.remaining), _long(event.sequence), at,
                             drawn, _long(event.pay_by)))  # fmt: skip
        rejected: Any = event
        return b"".join((self._rejected, common, self._reasons[rejected.reason],
                         _str(rejected.detail), _long(event.remaining), _long(event.sequence),
                         at, drawn))  # fmt: skip


def _enum_symbols(schema: dict[str, Any], field: str) -> list[str]:
    for f in schema["fields"]:
        if f["name"] == field:
            return list(f["type"]["symbols"])
    raise ValueError(f"{schema['name']} has no field {field!r}")
