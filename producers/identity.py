"""Deterministic identities: the same (user, sale, idempotency key) is the same intent anywhere."""

from __future__ import annotations

import uuid

_INTENTS = uuid.UUID("6f1b2f5e-3c9a-4d0e-9d1e-5a7f0c2b8e11")
DECISIONS_NAMESPACE = uuid.UUID("0b9a4c7d-8e21-4f3a-b6d5-2c1e9f8a7d44")


def intent_id_for(user_id: str, sale_id: str, idempotency_key: str) -> str:
    """Intent id derived from who, which sale and the client's idempotency key."""
    return uuid.uuid5(_INTENTS, f"{user_id}\x1f{sale_id}\x1f{idempotency_key}").hex


def decision_event_id(intent_id: str) -> str:
    """Event id of an intent's decision: a re-emitted decision is byte-identical."""
    return str(uuid.uuid5(DECISIONS_NAMESPACE, intent_id))
