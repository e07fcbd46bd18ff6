"""`flashsale audit fairness <sale>`: the pre-queue's draw, recomputed from the log alone.

Per SKU of the sale, from the committed decisions topic: the seed in ``DrawRevealed`` must
hash to the commitment ``SaleOpened`` carried; the digest it names must be the digest of the
entries the log queued (``EntryQueued``, kind ENTRY) before it; every entry must be decided
once, after the draw, with the rank the published algorithm gives it
(``processors.core.prequeue.draw_order``), ranks 1..n in log order; every repeat must be
rejected ``ALREADY_QUEUED``; and no queued intent may be decided before the draw. In a sale with
holds and a waitlist the draw may waitlist an entry at its rank instead (its decision comes
when a unit returns to it, or when none can). A sale whose
queue expired must reject every queued intent ``DRAW_NOT_REVEALED``. The whole sale audit
(``flashsale audit sale``: one decision per intent, no oversell, every fact re-decided by the
rules) runs too. Exit 0 when everything holds, 1 when not.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from flashsale import input_audit, sale_audit
from flashsale.kafka_auth import Consumer
from flashsale.topics import TopicNames
from processors.core.prequeue import commitment, draw_order, entries_digest
from processors.records import PROGRESS
from schemas.codec import SchemaRegistry

Fact = tuple[str, dict[str, Any]]
DECISIONS = ("IntentAccepted", "IntentRejected")
RANKED = (*DECISIONS, "Waitlisted")


@dataclass
class DrawFigures:
    """One SKU's pre-queue as the log tells it."""

    commitment: str | None = None
    seed: str | None = None
    entrants: int = 0
    repeats: int = 0
    late: int = 0
    winners: int = 0
    outcome: str = "pending"  # drawn, expired or pending (neither yet)


@dataclass
class FairnessAudit:
    """The verdict on a sale's draws."""

    sale_id: str
    skus: dict[str, DrawFigures] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    sale_audit: str = "not run"

    @property
    def passed(self) -> bool:
        return not self.violations and self.sale_audit == "pass"

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": "pass" if self.passed else "fail"}


def check_draw(sku: str, facts: list[Fact]) -> tuple[DrawFigures, list[str]]:
    """The draw of one (sale, SKU) from its facts in sequence order: figures and problems."""
    fig, bad = DrawFigures(), []
    opened = next((r for n, r in facts if n == "SaleOpened"), None)
    if opened is None or opened.get("draw_commitment") is None:
        return fig, [f"{sku}: the sale has no pre-queue (no commitment in SaleOpened)"]
    fig.commitment = opened["draw_commitment"]
    queued = {r["intent_id"]: r for n, r in facts if n == "EntryQueued"}
    kinds = [r["kind"] for r in queued.values()]
    fig.entrants, fig.repeats, fig.late = (kinds.count(k) for k in ("ENTRY", "REPEAT", "LATE"))
    end = next((i for i, (n, _) in enumerate(facts) if n in ("DrawRevealed", "QueueExpired")),
               len(facts))  # fmt: skip
    early = [r["intent_id"] for n, r in facts[:end] if n in DECISIONS and r["intent_id"] in queued]
    if early:
        bad.append(f"{sku}: {len(early)} queued intents decided before the draw: {early[:3]}")
    decided = {r["intent_id"]: (n, r) for n, r in facts[end:] if n in DECISIONS}
    if end == len(facts):
        return fig, bad  # nothing drawn or expired yet
    name, record = facts[end]
    if name == "QueueExpired":
        fig.outcome = "expired"
        wrong = [i for i in queued if decided.get(i, ("", {}))[1].get("reason")
                 != "DRAW_NOT_REVEALED"]  # fmt: skip
        if wrong:
            bad.append(f"{sku}: expired, but {len(wrong)} queued intents were not rejected "
                       f"DRAW_NOT_REVEALED: {wrong[:3]}")  # fmt: skip
        return fig, bad
    fig.outcome, fig.seed = "drawn", record["seed"]
    if commitment(record["seed"]) != fig.commitment:
        bad.append(f"{sku}: the revealed seed does not hash to the commitment")
    entries = [(r["user_id"], i, r["quantity"]) for i, r in queued.items() if r["kind"] == "ENTRY"]
    if record["entries_digest"] != entries_digest(entries) or record["entrants"] != len(entries):
        bad.append(f"{sku}: the draw names another entry set than the log queued "
                   f"({record['entrants']} entrants named, {len(entries)} queued)")  # fmt: skip
    _, order = draw_order(record["seed"], entries)
    # A drawn entry is decided, or (a sale with holds and a waitlist) waitlisted, at its rank.
    ranked = [r for n, r in facts[end:] if n in RANKED and r.get("draw_rank")]
    waiting = {r["intent_id"] for n, r in facts[end:] if n == "Waitlisted"}
    want = [(intent, k, len(order)) for k, (_, intent, _) in enumerate(order, 1)]
    got = [(r["intent_id"], r["draw_rank"], r["draw_size"]) for r in ranked]
    if got != want:
        first = next((k for k, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
                     min(len(got), len(want)))  # fmt: skip
        bad.append(f"{sku}: the decisions do not follow the draw (first difference at rank "
                   f"{first + 1}; {len(got)} ranked decisions, {len(want)} entries)")  # fmt: skip
    fig.winners = sum(1 for n, r in facts[end:] if n == "IntentAccepted" and r.get("draw_rank"))
    for intent, r in queued.items():
        seen = decided.get(intent)
        if seen is None and intent not in waiting:  # (a waitlisted one is decided later)
            bad.append(f"{sku}: queued intent {intent} has no decision after the draw")
        elif seen is None:
            continue
        elif r["kind"] == "REPEAT" and seen[1].get("reason") != "ALREADY_QUEUED":
            bad.append(f"{sku}: repeat {intent} was not rejected ALREADY_QUEUED")
    return fig, bad


def follow_sale(
    bootstrap: str,
    topic: str,
    sale_id: str,
    until: Callable[[list[Fact]], bool],
    timeout: float = 90.0,
    seen: Callable[[list[Fact]], None] | None = None,
) -> list[Fact]:
    """The sale's committed facts in log order, read from offset 0 until ``until`` holds for
    them (``seen`` after each poll that brought some); TimeoutError after ``timeout`` s."""
    registry = SchemaRegistry.load_default()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"follow-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "log_level": 3})  # fmt: skip
    facts: list[Fact] = []
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout
        while not until(facts):
            if time.monotonic() > deadline:
                kinds = Counter(n for n, _ in facts)
                raise TimeoutError(f"sale {sale_id}: the log did not get there in {timeout} s "
                                   f"(facts so far: {dict(kinds)})")  # fmt: skip
            before = len(facts)
            for msg in consumer.consume(1000, 0.3):
                value = msg.value()
                if msg.error() is None and value:
                    name, record = registry.decode(value)
                    if record.get("sale_id") == sale_id:
                        facts.append((name, record))
            if seen is not None and len(facts) > before:
                seen(facts)
    finally:
        consumer.close()
    return facts


def counted(name: str, n: int) -> Callable[[list[Fact]], bool]:
    """``until`` for ``follow_sale``: at least ``n`` facts named ``name``."""
    return lambda facts: sum(1 for f, _ in facts if f == name) >= n


def counted_decisions(n: int) -> Callable[[list[Fact]], bool]:
    """``until`` for ``follow_sale``: at least ``n`` decisions."""
    return lambda facts: sum(1 for f, _ in facts if f in DECISIONS) >= n


def audit_fairness(
    bootstrap: str, names: TopicNames, sale_id: str, timeout: float = 120.0
) -> FairnessAudit:
    """Read the decisions topic and check every SKU's draw, then the whole sale audit."""
    registry = SchemaRegistry.load_default()
    msgs = input_audit.read_topic(bootstrap, names.decisions, True, timeout)
    by_sku: dict[str, list[Fact]] = defaultdict(list)
    for _, _, name, record in input_audit.decode_all(registry, msgs):
        if name and name != PROGRESS and record.get("sale_id") == sale_id:
            by_sku[record["sku"]].append((name, record))
    out = FairnessAudit(sale_id)
    if not by_sku:
        out.violations.append(f"no facts for sale {sale_id!r}")
    for sku, facts in sorted(by_sku.items()):
        facts.sort(key=lambda f: f[1]["sequence"])
        out.skus[sku], problems = check_draw(sku, facts)
        out.violations += problems
    verdict = sale_audit.audit_sale(bootstrap, names, sale_id, timeout)
    out.sale_audit = "pass" if verdict.passed else "fail"
    out.violations += [f"sale audit: {v.kind}: {v.detail}" for v in verdict.violations[:20]]
    return out


def render(audit: FairnessAudit) -> str:
    """The human report."""
    lines = [f"sale {audit.sale_id}: fairness {'PASS' if audit.passed else 'FAIL'}"]
    for sku, f in sorted(audit.skus.items()):
        lines.append(f"  {sku}: {f.outcome}; commitment {f.commitment}; seed {f.seed}; "
                     f"{f.entrants} entrants, {f.repeats} repeats, {f.late} late; "
                     f"{f.winners} drawn winners")  # fmt: skip
    lines += [f"  VIOLATION {v}" for v in audit.violations]
    lines.append(f"  sale audit: {audit.sale_audit}")
    return "\n".join(lines)
