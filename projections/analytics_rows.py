"""Pure mapping from decoded records to the analytics projection's rows (no Kafka, no Postgres).

One batch becomes, per (sale, SKU, second of log time), the counts of what happened in that
second, plus the intents each person sent per sale. A command counts in the second it was
appended (the command topic uses the broker's log time); a decision in the second of its own
record's log time, so arrivals and decisions can be drawn on one time axis.

Decision latency is the time from the log time of the command that caused an intent's
decision (``decided_at``) to the decision record's log time: the writer's share of an intent's
wait, counted in fixed buckets (``LATENCY_BUCKETS_MS``) so batches add up exactly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from projections.rows import utc

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
"""Upper bounds (inclusive) of the latency buckets; one more bucket counts what is above."""

COUNTS = ("received", "accepted", "accepted_units", "rejected", "queued", "drawn", "deferred",
          "held", "waitlisted", "paid", "expired", "cancelled", "refunded")  # fmt: skip
"""The additive counts of a second, in column order."""
_json = msgspec.json.Encoder()
_INDEX = {name: i for i, name in enumerate(COUNTS)}
_ACCEPTED, _UNITS, _REJECTED = _INDEX["accepted"], _INDEX["accepted_units"], _INDEX["rejected"]
_HELD, _DRAWN = _INDEX["held"], _INDEX["drawn"]

INTENT_FACTS = frozenset(
    {"IntentAccepted", "IntentRejected", "EntryQueued", "Waitlisted", "IntentDeferred"}
)
"""Facts that answer an intent (finally: accepted, rejected; for now: queued, waitlisted,
deferred): the latency of each is measured."""
_PLAIN = {"EntryQueued": "queued", "IntentDeferred": "deferred", "Waitlisted": "waitlisted",
          "OrderPaid": "paid", "HoldExpired": "expired", "HoldCancelled": "cancelled",
          "OrderRefunded": "refunded"}  # fmt: skip


@dataclass(slots=True)
class Second:
    """What one (sale, SKU) did in one second."""

    counts: list[int] = field(default_factory=lambda: [0] * len(COUNTS))
    reasons: Counter[str] = field(default_factory=Counter)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    remaining: int | None = None
    remaining_sequence: int = -1


Key = tuple[str, str, int]
"""sale_id, sku, second (epoch seconds)."""


@dataclass(slots=True)
class AnalyticsRows:
    """One batch's aggregates: ``seconds`` by (sale, SKU, second), ``users`` by (sale, user)."""

    seconds: dict[Key, Second] = field(default_factory=dict)
    users: Counter[tuple[str, str]] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.seconds) + len(self.users)

    def _second(self, record: dict[str, Any], timestamp_ms: int) -> Second:
        key = (record["sale_id"], record["sku"], timestamp_ms // 1000)
        second = self.seconds.get(key)
        if second is None:
            second = self.seconds[key] = Second()
        return second

    def add(self, name: str, record: dict[str, Any], timestamp_ms: int) -> None:
        """Count one record appended at ``timestamp_ms`` (its log time)."""
        if "sale_id" not in record:
            return  # a clock tick
        if name == "PurchaseIntent":
            self._second(record, timestamp_ms).counts[0] += 1
            self.users[(record["sale_id"], record["user_id"])] += 1
            return
        if "sequence" not in record:
            return  # another command, or a progress mark: nothing to count
        s = self._second(record, timestamp_ms)
        counts = s.counts
        if name == "IntentAccepted":
            counts[_ACCEPTED] += 1
            counts[_UNITS] += record["quantity"]
            if record.get("pay_by"):
                counts[_HELD] += 1
        elif name == "IntentRejected":
            counts[_REJECTED] += 1
            s.reasons[record["reason"]] += 1
        elif name in _PLAIN:
            counts[_INDEX[_PLAIN[name]]] += 1
        if name in INTENT_FACTS:
            waited = max(timestamp_ms - record["decided_at"], 0)
            s.latency[bisect_left(LATENCY_BUCKETS_MS, waited)] += 1
            if record.get("draw_rank"):  # an answer to a drawn pre-queue entry
                counts[_DRAWN] += 1
        remaining = record["allocation"] if name == "SaleOpened" else record.get("remaining")
        sequence = record.get("sequence", -1)
        if remaining is not None and sequence > s.remaining_sequence:
            s.remaining, s.remaining_sequence = remaining, sequence

    def seconds_columns(self) -> list[list[Any]]:
        """The seconds as columns for one ``unnest`` upsert (reasons and buckets as text)."""
        rows = []
        for (sale, sku, second), s in self.seconds.items():
            reasons = _json.encode(dict(sorted(s.reasons.items()))).decode()
            latency = "{" + ",".join(map(str, s.latency)) + "}"
            rows.append((sale, sku, utc(second * 1000), *s.counts, reasons, latency,
                         s.remaining, s.remaining_sequence))  # fmt: skip
        return [list(c) for c in zip(*rows, strict=True)]

    def users_columns(self) -> list[list[Any]]:
        """The (sale, user) intent counts as three columns."""
        return [[s for s, _ in self.users], [u for _, u in self.users], list(self.users.values())]


def aggregate(records: Iterable[tuple[str, dict[str, Any], int]]) -> AnalyticsRows:
    """The rows of (name, record, log time in ms) triples."""
    rows = AnalyticsRows()
    for name, record, at in records:
        rows.add(name, record, at)
    return rows


def percentile(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile (0-1) of a latency histogram, in ms: the upper bound of its bucket,
    interpolated linearly inside it (the overflow bucket reads as twice the last bound)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    bounds = (0, *LATENCY_BUCKETS_MS, 2 * LATENCY_BUCKETS_MS[-1])
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            low, high = bounds[i], bounds[i + 1]
            return low + (high - low) * max(rank - seen, 0) / count
        seen += count
    return float(bounds[-1])
