"""An independent check of a sale from the topics alone: oversell, duplicates, losses.

It shares no state with the processor: it reads the sale's terms (SaleOpened) and every
decision from the decisions topic (read_committed) with its own consumer, and counts each
intent id once.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from flashsale.input_audit import read_topic
from flashsale.kafka_auth import Consumer
from flashsale.topics import TopicNames
from processors.records import DECISION_RECORDS, PROGRESS
from schemas.codec import SchemaRegistry, UndecodableRecord


@dataclass
class AuditReport:
    """What the log says about one sale."""

    allocation: dict[str, int] = field(default_factory=dict)
    accepted_units: dict[str, int] = field(default_factory=dict)
    returned_units: dict[str, int] = field(default_factory=dict)  # given back (UnitsReturned)
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    decisions_seen: int = 0
    repeated_decisions: int = 0  # a second decision record for an intent id: never allowed
    conflicting: list[str] = field(default_factory=list)  # intent ids with two different decisions
    sequence_gaps: dict[str, int] = field(default_factory=dict)
    user_limit_breaches: int = 0

    @property
    def oversold(self) -> int:
        """Units accepted beyond the allocation, over all SKUs."""
        return sum(
            max(0, self.accepted_units.get(sku, 0) - self.returned_units.get(sku, 0) - alloc)
            for sku, alloc in self.allocation.items()
        )

    @property
    def invariants_hold(self) -> bool:
        return (
            self.oversold == 0
            and self.repeated_decisions == 0
            and not self.conflicting
            and not self.sequence_gaps
            and self.user_limit_breaches == 0
        )


class DecisionAudit:
    """Consumes a sale's decisions from offset 0 and keeps one decision per intent id."""

    def __init__(
        self, bootstrap: str, names: TopicNames, sale_id: str, committed_only: bool = True
    ) -> None:
        """``committed_only=False`` also sees records of aborted transactions (diagnostics)."""
        self._bootstrap = bootstrap
        self._names = names
        self.sale_id = sale_id
        self._registry = SchemaRegistry.load_default()
        self._consumer = _consumer(bootstrap, committed_only)
        md = self._consumer.list_topics(names.decisions, timeout=10)
        parts = md.topics[names.decisions].partitions
        self._consumer.assign([TopicPartition(names.decisions, p, OFFSET_BEGINNING) for p in parts])
        self.decisions: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self.first_seen_ms: dict[str, float] = {}
        self._seen = 0
        self._repeats = 0
        self._conflicts: list[str] = []

    def poll(self, timeout: float = 0.2) -> int:
        """Consume what is available; return how many new intents got their decision."""
        new = 0
        for msg in self._consumer.consume(2000, timeout):
            if msg.error():
                continue
            value = msg.value() or b""
            try:
                name, record = self._registry.decode(value)
            except UndecodableRecord:
                continue
            if record.get("sale_id") != self.sale_id or name not in DECISION_RECORDS:
                continue
            self._seen += 1
            intent = record["intent_id"]
            known = self.decisions.get(intent)
            if known is None:
                record["_name"] = name
                self.decisions[intent] = (value, record)
                self.first_seen_ms[intent] = time.time() * 1000
                new += 1
            elif known[0] == value:
                self._repeats += 1
            else:
                self._conflicts.append(intent)
        return new

    def wait_for(self, intent_ids: set[str], timeout: float) -> set[str]:
        """Poll until every intent id has a decision or timeout; return the missing ids."""
        deadline = time.monotonic() + timeout
        missing = intent_ids - self.decisions.keys()
        while missing and time.monotonic() < deadline:
            self.poll(0.2)
            missing = intent_ids - self.decisions.keys()
        return missing

    def sale_facts(self, timeout: float = 120.0) -> tuple[dict[str, dict[str, Any]], list[Any]]:
        """The sale's SaleOpened records per SKU, and every other fact that is not a decision."""
        terms: dict[str, dict[str, Any]] = {}
        facts: list[Any] = []
        for msg in read_topic(self._bootstrap, self._names.decisions, True, timeout):
            try:
                name, record = self._registry.decode(msg.value() or b"")
            except UndecodableRecord:
                continue
            if record.get("sale_id") != self.sale_id or name in DECISION_RECORDS:
                continue
            if name == PROGRESS:  # not a numbered fact of the sale
                continue
            facts.append(record)
            if name == "SaleOpened":
                terms.setdefault(record["sku"], record)
        return terms, facts

    def report(self) -> AuditReport:
        """Invariants computed from the decisions collected so far."""
        rep = AuditReport(decisions_seen=self._seen, repeated_decisions=self._repeats)
        rep.conflicting = list(self._conflicts)
        terms, facts = self.sale_facts()
        returned: Counter[str] = Counter()
        for r in facts:
            if "requested" in r:  # UnitsReturned
                returned[r["sku"]] += r["quantity"]
        rep.allocation = {sku: t["allocation"] for sku, t in terms.items()}
        units: Counter[str] = Counter()
        per_user: Counter[tuple[str, str]] = Counter()
        reasons: Counter[str] = Counter()
        sequences: dict[str, list[int]] = defaultdict(list)
        for _, r in self.decisions.values():
            sequences[r["sku"]].append(r["sequence"])
            if r["_name"] == "IntentAccepted":
                rep.accepted += 1
                units[r["sku"]] += r["quantity"]
                per_user[(r["sku"], r["user_id"])] += r["quantity"]
            else:
                rep.rejected += 1
                reasons[r["reason"]] += 1
        rep.accepted_units = dict(units)
        rep.returned_units = dict(returned)
        rep.rejected_by_reason = dict(reasons)
        for (sku, _user), bought in per_user.items():
            limit = terms.get(sku, {}).get("per_user_limit")
            if limit is not None and bought > limit:
                rep.user_limit_breaches += 1
        # Facts are read to the end of the topic, decisions only as far as polled so far: a fact
        # numbered after the last decision polled is not yet comparable.
        for r in facts:
            polled = sequences.get(r["sku"])
            if polled and r["sequence"] < max(polled):
                polled.append(r["sequence"])
        for sku, seqs in sequences.items():
            seqs.sort()
            # Every event of (sale, SKU), facts and decisions, is numbered 1..N without gaps.
            if seqs != list(range(1, len(seqs) + 1)):
                rep.sequence_gaps[sku] = len(set(range(1, max(seqs) + 1)) - set(seqs))
        return rep

    def close(self) -> None:
        self._consumer.close()


def _consumer(bootstrap: str, committed_only: bool = True) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"flashsale-audit-{uuid.uuid4().hex}",
            "isolation.level": "read_committed" if committed_only else "read_uncommitted",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "log_level": 3,
        }
    )
