"""`flashsale audit sale <sale>`: what the log alone proves about a sale.

Reads the command, decisions (read_committed) and dead-letter topics from offset 0 to the end
offsets seen at the start, with consumers of its own: no PostgreSQL, no writer state. The
terms and every fact come from the decisions topic; the command topic is read only to account
for every input offset. Every invariant the log can prove today is checked, and every event is
decided again by the core under the rules version its sale opened with; each failure is a
``Violation`` naming its kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale import input_audit
from flashsale.lifecycle_audit import RELEASES, check_lifecycle
from flashsale.progress_audit import check_progress
from flashsale.rules_audit import check_rules
from flashsale.rules_audit import command_for as command_for
from flashsale.settings import Settings
from flashsale.topics import TopicNames
from processors.records import DECISION_RECORDS, PROGRESS
from schemas.codec import SchemaRegistry

Fact = tuple[str, dict[str, Any]]
SHOWN = 5  # examples listed per kind of violation in the human report
WAITING = ("EntryQueued", "Waitlisted", "IntentDeferred")  # not decisions: they come later


@dataclass(frozen=True)
class Violation:
    """One broken invariant: its kind and where."""

    kind: str  # oversell, user-limit, second-decision, conflicting-decision, undecided-intent,
    # unaccounted-offset, orphan-decision, sequence-gap, remaining-mismatch, no-terms,
    # rules-mismatch (the sale's rules version would not decide so), unfoldable,
    # log-time-mismatch, progress-missing / -unexpected / -mismatch / -offset, lifecycle
    detail: str


@dataclass
class SkuFigures:
    """One SKU of the sale, as its decisions say."""

    allocation: int
    rules_version: int | None = None  # of the intent rules the sale was decided under
    accepted: int = 0
    rejected: int = 0
    units_sold: int = 0
    units_returned: int = 0
    units_released: int = 0  # of holds that expired or were cancelled (back in the sale)
    units_paid: int = 0  # of holds paid
    units_added: int = 0  # to the allocation by the operator
    units_refunded: int = 0  # of paid orders of a cancelled sale (back in the sale)
    remaining: int | None = None  # as the last event says


@dataclass
class SaleAudit:
    """The verdict on one sale and what it was computed from."""

    sale_id: str
    skus: dict[str, SkuFigures] = field(default_factory=dict)
    decisions: int = 0
    inputs: input_audit.InputAccount = field(default_factory=input_audit.InputAccount)
    violations: list[Violation] = field(default_factory=list)
    records_read: int = 0
    seconds: float = 0.0

    @property
    def input_offsets(self) -> int:
        """Command-topic records of the sale."""
        return self.inputs.inputs

    @property
    def repeats(self) -> int:
        """Intents sent again after their decision (no decision of their own)."""
        return self.inputs.repeats

    @property
    def passed(self) -> bool:
        """No invariant broken."""
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        """The audit as plain data (``--json``)."""
        out = asdict(self)
        out["verdict"] = "pass" if self.passed else "fail"
        out["records_per_s"] = round(self.records_read / self.seconds) if self.seconds else None
        return out


def audit_sale(
    bootstrap: str, names: TopicNames, sale_id: str, timeout: float = 120.0
) -> SaleAudit:
    """Read the topics and check every invariant for ``sale_id``."""
    began = time.monotonic()
    registry = SchemaRegistry.load_default()
    read = input_audit.read_topic
    commands_msgs = read(bootstrap, names.sku_commands, False, timeout)
    decided_msgs = read(bootstrap, names.decisions, True, timeout)
    dead_msgs = read(bootstrap, names.dead_letters, True, timeout)
    out = SaleAudit(sale_id, records_read=len(commands_msgs) + len(decided_msgs) + len(dead_msgs))
    commands = input_audit.decode_all(registry, commands_msgs)
    decided = input_audit.decode_all(registry, decided_msgs)

    events: list[tuple[str, dict[str, Any]]] = []  # the sale's facts, each decision once
    progress: list[dict[str, Any]] = []  # its QueueProgress facts (not numbered)
    first: dict[str, bytes] = {}  # intent id -> its decision's bytes
    for msg, (_, _, name, rec) in zip(decided_msgs, decided, strict=True):
        if not name or rec.get("sale_id") != sale_id:
            continue
        if name == PROGRESS:
            progress.append(rec)
            continue
        if name in DECISION_RECORDS:
            value, intent = msg.value() or b"", rec["intent_id"]
            if intent in first:
                kind = "second-decision" if first[intent] == value else "conflicting-decision"
                out.violations.append(Violation(kind, f"intent {intent}"))
                continue
            first[intent] = value
        events.append((name, rec))
    out.decisions = len(first)
    terms = {r["sku"]: r for n, r in events if n == "SaleOpened"}
    if not terms:
        out.violations.append(Violation("no-terms", f"no SaleOpened for sale {sale_id!r}"))
    out.skus = {sku: SkuFigures(t["allocation"], t["rules_version"]) for sku, t in terms.items()}
    _check_events(out, terms, events)
    timed = [(name, rec, msg.timestamp()[1])
             for msg, (_, _, name, rec) in zip(commands_msgs, commands, strict=True)
             if rec.get("sale_id") == sale_id]  # fmt: skip
    check_log_times(out, timed, events)
    by_place = {(p, o): (name, rec, m.timestamp()[1])
                for m, (p, o, name, rec) in zip(commands_msgs, commands, strict=True)}  # fmt: skip
    for kind, detail in check_progress(events, progress, by_place):
        out.violations.append(Violation(kind, detail))

    dead = input_audit.dead_letter_sources(names, dead_msgs)
    out.inputs = account = input_audit.account_records(commands, decided, dead, sale_id)
    undecided = set(account.undecided.values())
    for partition, offset in account.unaccounted:
        if (partition, offset) not in undecided:
            out.violations.append(Violation("unaccounted-offset", f"{partition}:{offset}"))
    for intent, (partition, offset) in sorted(account.undecided.items()):
        out.violations.append(Violation("undecided-intent", f"{intent} at {partition}:{offset}"))
    for intent in account.orphan_decisions:
        out.violations.append(Violation("orphan-decision", f"intent {intent}"))
    out.seconds = time.monotonic() - began
    return out


def check_log_times(
    out: SaleAudit, commands: list[tuple[str, dict[str, Any], int]], events: list[Fact]
) -> None:
    """Each fact's time is the log time of the command that caused it, read from the command
    topic (the broker's append time), not taken from the writer: an intent decided or queued
    carries its own first occurrence's time; a draw, and every decision ranked in it, the time
    of a ``RevealDraw`` of that SKU. So a writer that backdates an entry into the window (or
    a decision into the sale) is caught here."""
    intent_at: dict[str, int] = {}
    reveals: set[tuple[str, int]] = set()
    for name, rec, at in commands:
        if name == "PurchaseIntent":
            intent_at.setdefault(rec["intent_id"], at)
        elif name == "RevealDraw":
            reveals.add((rec["sku"], at))
    # Queued or waitlisted intents are decided later, by the command that drew or served them.
    queued = {rec["intent_id"] for name, rec in events if name in WAITING}
    # A pause's deferred intents are waitlisted or decided when it ends, at that command's time;
    # a pre-queue's late arrivals when it is drawn.
    deferred = {rec["intent_id"] for name, rec in events if name in ("IntentDeferred",
                                                                     "EntryQueued")}  # fmt: skip
    for name, rec in events:
        where = f"{rec['sku']} #{rec['sequence']}"
        drawn = name in DECISION_RECORDS or name == "Waitlisted"
        if name == "DrawRevealed" or (drawn and rec.get("draw_rank")):
            if (rec["sku"], rec["decided_at"]) not in reveals:
                out.violations.append(Violation(
                    "log-time-mismatch", f"{where}: {name} at {rec['decided_at']}, when no "
                    "RevealDraw of this SKU was appended"))  # fmt: skip
        elif (name in WAITING or (name in DECISION_RECORDS and rec["intent_id"] not in queued)
              ) and (name in ("IntentDeferred", "EntryQueued")
                     or rec["intent_id"] not in deferred):  # fmt: skip
            appended = intent_at.get(rec["intent_id"])
            if appended is not None and appended != rec["decided_at"]:
                out.violations.append(Violation(
                    "log-time-mismatch", f"{where}: {name} of {rec['intent_id']} at "
                    f"{rec['decided_at']}, its intent was appended at {appended}"))  # fmt: skip


def _check_events(
    out: SaleAudit, terms: dict[str, dict[str, Any]], events: list[tuple[str, dict[str, Any]]]
) -> None:
    """Per (sale, SKU): gap-free sequence, remaining, oversell, per-user limits, the rules.

    The rules check folds the core's ``evolve`` over the events in sequence order and asks
    ``decide`` what each event's command (rebuilt from the event: an intent from its decision,
    an opening from its terms, ...) yields at the event's log time under the sale's rules
    version: a decision the rules would not have made is a ``rules-mismatch``.
    """
    bought: Counter[tuple[str, str]] = Counter()
    by_sku: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for name, rec in events:
        by_sku[rec["sku"]].append((name, rec))
    for sku, items in sorted(by_sku.items()):
        items.sort(key=lambda item: item[1]["sequence"])
        fig = out.skus.setdefault(sku, SkuFigures(0))
        t = terms.get(sku)
        seqs = [rec["sequence"] for _, rec in items]
        if seqs != list(range(1, len(seqs) + 1)):
            missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
            out.violations.append(Violation("sequence-gap", f"{sku}: missing {missing[:SHOWN]}"))
        remaining: int | None = None
        for name, rec in items:
            if name == "SaleOpened":
                remaining = rec["allocation"]
            elif name == "IntentAccepted":
                fig.accepted += 1
                fig.units_sold += rec["quantity"]
                bought[(sku, rec["user_id"])] += rec["quantity"]
                if remaining is not None:
                    remaining -= rec["quantity"]
            elif name == "IntentRejected":
                fig.rejected += 1
            elif name == "UnitsReturned":
                fig.units_returned += rec["quantity"]
                if remaining is not None:
                    remaining += rec["quantity"]
            elif name in RELEASES:  # a hold expired or was cancelled: its units came back
                fig.units_released += rec["quantity"]
                if remaining is not None:
                    remaining += rec["quantity"]
            elif name == "UnitsAdded" or name == "OrderRefunded":
                if name == "UnitsAdded":
                    fig.units_added += rec["quantity"]
                else:
                    fig.units_refunded += rec["quantity"]
                if remaining is not None:
                    remaining += rec["quantity"]
            elif name == "OrderPaid":
                fig.units_paid += rec["quantity"]
            if "remaining" not in rec or remaining is None:
                continue  # no count yet: before SaleOpened there is nothing to sell
            if rec["remaining"] != remaining:
                out.violations.append(Violation(
                    "remaining-mismatch", f"{sku} #{rec['sequence']}: says {rec['remaining']}, "
                    f"the events before it leave {remaining}"))  # fmt: skip
                remaining = rec["remaining"]  # report each break once, not every later event
            fig.remaining = rec["remaining"]
        out.violations += [Violation("lifecycle", p) for p in check_lifecycle(sku, t, items)]
        if (
            t is not None
            and fig.units_sold - fig.units_returned - fig.units_released - fig.units_refunded
            > t["allocation"] + fig.units_added
        ):
            had = t["allocation"] + fig.units_added
            sold = f"{sku}: {fig.units_sold} units sold of {had}"
            out.violations.append(Violation("oversell", sold))
        out.violations += [Violation(kind, detail) for kind, detail in check_rules(sku, items)]
    for (sku, user), units in sorted(bought.items()):
        limit = terms.get(sku, {}).get("per_user_limit")
        if limit is not None and units > limit:
            out.violations.append(Violation("user-limit", f"{sku}: {user} got {units} > {limit}"))


def render(audit: SaleAudit) -> str:
    """The human report."""
    lines = [f"sale {audit.sale_id}: {'PASS' if audit.passed else 'FAIL'}"]
    for sku, f in sorted(audit.skus.items()):
        counts = f"{f.accepted} accepted, {f.rejected} rejected"
        back = f", {f.units_returned} returned" if f.units_returned else ""
        lines.append(f"  {sku}: allocation {f.allocation} (rules v{f.rules_version}), sold "
                     f"{f.units_sold} ({counts}){back}, remaining {f.remaining}")  # fmt: skip
    inputs = audit.inputs
    lines.append(f"  {audit.decisions} decisions; {inputs.inputs} input offsets "
                 f"({inputs.repeats} repeats, {inputs.dead_lettered} dead-lettered)")  # fmt: skip
    kinds = Counter(v.kind for v in audit.violations)
    for kind, n in sorted(kinds.items()):
        shown = [v.detail for v in audit.violations if v.kind == kind][:SHOWN]
        lines.append(f"  VIOLATION {kind} x{n}: " + "; ".join(shown))
    rate = f"{audit.records_read / audit.seconds:,.0f}" if audit.seconds else "-"
    lines.append(f"  read {audit.records_read} records in {audit.seconds:.2f} s ({rate}/s)")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale audit sale <sale>` and `flashsale audit fairness <sale>`."""
    p = sub.add_parser("audit", help="check a sale's invariants from the topics alone")
    what = p.add_subparsers(dest="what", required=True)
    s = what.add_parser("sale", help="one sale: exit 0 when every invariant holds, 1 when not")
    s.add_argument("sale_id")
    s.add_argument("--json", action="store_true", help="print the audit as JSON")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to read each topic")
    s.set_defaults(run=run)
    f = what.add_parser("fairness", help="one sale's pre-queue draw, recomputed from the log")
    f.add_argument("sale_id")
    f.add_argument("--json", action="store_true", help="print the audit as JSON")
    f.add_argument("--timeout", type=float, default=120.0, help="seconds to read each topic")
    f.set_defaults(run=_run_fairness)


def _run_fairness(args: argparse.Namespace, settings: Settings) -> int:
    from flashsale import fairness

    return _run_audit(args, settings, fairness.audit_fairness, fairness.render)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Audit one sale; print the report; 0 pass, 1 fail."""
    return _run_audit(args, settings, audit_sale, render)


def _run_audit(
    args: argparse.Namespace,
    settings: Settings,
    audit_of: Callable[[str, TopicNames, str, float], Any],
    shown: Callable[[Any], str],
) -> int:
    """An audit command: 0 pass, 1 fail, 2 when the topics could not be read to their end."""
    from infra.stack import Stack

    bootstrap = Stack(settings).endpoints().bootstrap
    try:
        audit = audit_of(bootstrap, TopicNames.of(settings), args.sale_id, args.timeout)
    except input_audit.IncompleteRead as exc:
        print(f"flashsale: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(audit.as_json(), indent=2) if args.json else shown(audit))
    return 0 if audit.passed else 1
