"""What the live feed (``producers.http.livefeed``) keeps and hands out: facts at their log
positions, position vectors (SSE event ids), one SSE stream's subscription, a sale's progress."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DECISIONS = frozenset({"IntentAccepted", "IntentRejected"})
# What a shopper is told about their own intent: its decision, or that it is queued in a
# pre-queue (its place and the pre-queue's size), pushed and answered like a decision.
PER_INTENT = DECISIONS | {"EntryQueued", "Waitlisted", "IntentDeferred"}
NOT_FINAL = frozenset({"EntryQueued", "Waitlisted", "IntentDeferred"})  # decided later
Accept = Callable[["Fact"], bool]
QUEUE_MAX = 1000


class Fact(NamedTuple):
    """One decoded record of the decisions topic at its log position."""

    partition: int
    offset: int
    name: str
    record: dict[str, Any]


# A fact as read: (partition, offset, name, record).
RawFact = tuple[int, int, str, dict[str, Any]]
# What the window keeps: the record's items instead of the record. Plain tuples of numbers
# and strings are not tracked by the cyclic GC (a tuple holding a dict, or an object, is):
# a window of 120,000 tracked facts made every full collection walk them all, tens of ms
# with the loop stopped.
# An intent's facts keep their user id and intent id, an order's facts their owner (None
# for other facts), so a resume or an eviction reads them without rebuilding the record.
Kept = tuple[int, int, str, tuple[tuple[str, Any], ...], str | None, str | None]


def _fact(kept: Kept) -> Fact:
    return Fact(kept[0], kept[1], kept[2], dict(kept[3]))


def format_position(offsets: Iterable[int]) -> str:
    return ".".join(str(o) for o in offsets)


def parse_position(text: str | None, partitions: int) -> list[int] | None:
    """A position vector, or None when absent or not one of this topic's."""
    if not text:
        return None
    parts = text.strip().split(".")
    if len(parts) != partitions or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


@dataclass(eq=False)  # compared and hashed by identity: one per SSE connection
class UserStream:
    """One SSE stream's subscription: its queue and the position it has delivered through."""

    user_id: str
    floor: list[int]  # per partition: every event of this user below it was sent
    queue: asyncio.Queue[tuple[str, Fact] | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_MAX)
    )


@dataclass
class SaleProgress:
    """A sale's units remaining per SKU, as of the last fact of each in the log, and the
    size of its pre-queue per SKU while intents are queued."""

    version: int = 0
    remaining: dict[str, int] = field(default_factory=dict)
    entrants: dict[str, int] = field(default_factory=dict)  # a pre-queue's size per SKU
    opened: set[str] = field(default_factory=set)  # SKUs whose SaleOpened this server read
