"""Deterministic identities: the same (user, sale, SKU, key) is the same intent anywhere."""

from __future__ import annotations

import hashlib
import os
import uuid

INTENTS_NAMESPACE = uuid.UUID("6f1b2f5e-3c9a-4d0e-9d1e-5a7f0c2b8e11")
DECISIONS_NAMESPACE = uuid.UUID("0b9a4c7d-8e21-4f3a-b6d5-2c1e9f8a7d44")
_INTENTS_BYTES = INTENTS_NAMESPACE.bytes


def intent_id_for(user_id: str, sale_id: str, sku: str, idempotency_key: str) -> str:
    """Intent id derived from who, which sale and SKU, and the client's idempotency key.

    The SKU is part of it so that one intent id always has one writer: a key reused for
    another SKU (another partition) is another intent, never a second copy of this one.
    """
    name = f"{user_id}\x1f{sale_id}\x1f{sku}\x1f{idempotency_key}".encode()
    # uuid.uuid5(INTENTS_NAMESPACE, name).hex without UUID objects (~1 µs instead of ~4 µs).
    d = bytearray(hashlib.sha1(_INTENTS_BYTES + name).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x50  # version 5
    d[8] = (d[8] & 0x3F) | 0x80  # RFC 4122 variant
    return d.hex()


_NS = DECISIONS_NAMESPACE.bytes
_VARIANT = {c: format((int(c, 16) & 0x3) | 0x8, "x") for c in "0123456789abcdef"}


def decision_event_id(intent_id: str) -> str:
    """Event id of an intent's decision: a re-emitted decision is byte-identical.

    ``str(uuid.uuid5(DECISIONS_NAMESPACE, intent_id))``, built without UUID objects (the
    writer computes one per decision: ~2 µs instead of ~6 µs).
    """
    x = hashlib.sha1(_NS + intent_id.encode()).hexdigest()
    # Version nibble (hex digit 12) is 5; the variant's top bits (digit 16) are 10.
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


def fact_event_id(sale_id: str, sku: str, sequence: int) -> str:
    """Event id of a sale fact (SaleOpened, SaleClosed, ...): unique per (sale, SKU, sequence)."""
    return str(uuid.uuid5(DECISIONS_NAMESPACE, f"{sale_id}\x1f{sku}\x1f{sequence}"))


def progress_event_id(sale_id: str, sku: str, after_sequence: int) -> str:
    """Event id of a ``QueueProgress``: unique per (sale, SKU, the event it follows)."""
    name = f"{sale_id}\x1f{sku}\x1fprogress\x1f{after_sequence}"
    return str(uuid.uuid5(DECISIONS_NAMESPACE, name))


def random_event_id() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` gives, without UUID
    objects: the edge makes one per intent (~1.5 µs instead of ~6 µs)."""
    x = os.urandom(16).hex()
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"
