"""What the fault harness checks after a sale: every promise, from the topics (read_committed,
offset 0) and from PostgreSQL once the projection caught up, and how the system recovered.
Each verified run appends its figures to ``.state/test/faults/results.jsonl`` (one line per
run: the closing notes' table is made from it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from flashsale import input_audit
from flashsale.sale_audit import audit_sale
from flashsale.settings import REPO_ROOT, Settings
from projections.catch_up import wait_until_projected
from projections.commands import live_name
from schemas.codec import SchemaRegistry
from tests.faults.harness import ALLOCATION, Sale, System

RESULTS = "faults/results.jsonl"  # under the test state dir
ANSWERS = ("IntentAccepted", "IntentRejected", "EntryQueued", "Waitlisted")


@dataclass
class Figures:
    """One verified run: the invariants' counts and the recovery, for the closing note."""

    scenario: str
    requests: int
    queued: int  # 202s (distinct intents)
    statuses: dict[str, int]
    decided: int
    accepted: int
    rejected: int
    paid: int
    expired: int
    held_at_end: int
    allocation: int
    in_flight_at_fault: int  # intents appended, not yet decided when the fault began
    recover_ms: int | None  # fault (or its end) to the first decision after it
    replay: str
    detail: dict[str, Any]


def verify(system: System, sale: Sale, scenario: str, replay: bool = True) -> Figures:
    """Every promise, from the topics (read_committed, offset 0) and PostgreSQL."""
    assert sale.crowd is not None
    bootstrap, names = system.endpoints.bootstrap, system.pipeline.names
    queued = set(sale.crowd.queued.values())
    assert queued, "the crowd got no 202 at all"
    audit = audit_sale(bootstrap, names, sale.sale_id)
    assert audit.passed, [f"{v.kind}: {v.detail}" for v in audit.violations[:8]] + system.troubles()
    decisions = Counter(r["intent_id"] for n, r in sale.facts
                        if n in ("IntentAccepted", "IntentRejected"))  # fmt: skip
    missing = queued - set(decisions)
    assert not missing, (f"{len(missing)} intents answered 202 have no decision",
                         system.troubles())  # fmt: skip
    assert max(decisions.values()) == 1, "an intent was decided twice"
    assert audit.inputs.unaccounted == [], "input offsets with no decision, repeat or letter"
    counts = Counter(n for n, _ in sale.facts)
    ended = counts["OrderPaid"] + counts["HoldExpired"] + counts["HoldCancelled"]
    assert ended == counts["IntentAccepted"], "a hold never ended (paid or expired)"
    wait_until_projected(bootstrap, system.endpoints.dsn, live_name(system.settings),
                         (names.decisions,), 120)  # fmt: skip
    with psycopg.connect(system.endpoints.dsn) as conn:
        rows = conn.execute(
            "SELECT sku, count(*), coalesce(sum(quantity) FILTER (WHERE status IN ('held',"
            " 'paying', 'paid', 'confirmed')), 0), coalesce(sum(quantity) FILTER (WHERE status"
            " IN ('held', 'paying')), 0), count(*) FILTER (WHERE status = 'paid') FROM orders"
            " WHERE sale_id = %s GROUP BY sku",
            (sale.sale_id,),
        ).fetchall()  # fmt: skip
    assert sum(r[1] for r in rows) == counts["IntentAccepted"], "orders projected != accepted"
    for sku, _, holding, _, _ in rows:
        assert holding <= ALLOCATION, f"{sku}: paid + held {holding} > {ALLOCATION}"
    assert sum(r[4] for r in rows) == counts["OrderPaid"], "paid orders projected != paid"
    assert sum(r[3] for r in rows) == 0, "PostgreSQL still shows held orders the log ended"
    verdict = replay_verdict(system) if replay else "skipped"
    assert verdict in ("same", "skipped"), f"projections differ from a replay: {verdict}"
    in_flight, recover = recovery(system, sale)
    figures = Figures(
        scenario, len(sale.plan), len(queued), {str(k): v for k, v in sale.crowd.statuses.items()},
        len(decisions), counts["IntentAccepted"], counts["IntentRejected"], counts["OrderPaid"],
        counts["HoldExpired"], sum(r[3] for r in rows), ALLOCATION * len(sale.skus), in_flight,
        recover, verdict, sale.hit.detail if sale.hit else {},
    )  # fmt: skip
    record(system.settings, figures)
    return figures


def replay_verdict(system: System) -> str:
    """``flashsale replay``: every projection rebuilt from offset 0 and compared with live."""
    env = {**os.environ, **system.env, "FLASHSALE_NAMESPACE": system.settings.namespace,
           "FLASHSALE_STATE_DIR": str(system.settings.state_dir)}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "flashsale.cli", "replay", "--json", "--wait",
                           "90"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    if done.returncode not in (0, 1):
        raise AssertionError(done.stdout[-2000:] + done.stderr[-2000:])
    return str(json.loads(done.stdout)["verdict"])


def recovery(system: System, sale: Sale) -> tuple[int, int | None]:
    """Intents appended but not decided when the fault began, and the ms from the fault's end
    to the first decision appended after it (log times, read from the topics)."""
    if sale.hit is None:
        return 0, None
    registry = SchemaRegistry.load_default()
    bootstrap, names = system.endpoints.bootstrap, system.pipeline.names
    commands = input_audit.read_topic(bootstrap, names.sku_commands, True, 30)
    decode = input_audit.decode_all
    appended = {rec["intent_id"]: m.timestamp()[1]
                for m, (_, _, name, rec) in zip(commands, decode(registry, commands), strict=True)
                if name == "PurchaseIntent" and rec.get("sale_id") == sale.sale_id}  # fmt: skip
    at = sale.hit.at_ms
    after = max(at, sale.hit.ended_ms)
    first_answer: dict[str, int] = {}  # intent id -> log time of its first answer
    first_after = None
    for _, rec, t in answer_times(system):
        if rec.get("sale_id") == sale.sale_id:
            first_answer.setdefault(rec["intent_id"], t)
        if t >= after and (first_after is None or t < first_after):
            first_after = t
    in_flight = sum(1 for i, t in first_answer.items() if appended.get(i, at + 1) <= at < t)
    return in_flight, None if first_after is None else first_after - after


def record(settings: Settings, figures: Figures) -> None:
    """Append the run's figures to the results file (and print them for the test log)."""
    path = settings.state_dir / "test" / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **asdict(figures)})
    with path.open("a") as f:
        f.write(line + "\n")
    print(line)


def answer_times(system: System) -> list[tuple[str, dict[str, Any], int]]:
    """Every answer to an intent in the decision topic, with the log time the writer's
    transaction appended it (not the command's time, which ``decided_at`` carries)."""
    msgs = input_audit.read_topic(system.endpoints.bootstrap, system.pipeline.names.decisions,
                                  True, 30)  # fmt: skip
    decoded = input_audit.decode_all(SchemaRegistry.load_default(), msgs)
    pairs = zip(msgs, decoded, strict=True)
    return [(name, rec, m.timestamp()[1]) for m, (_, _, name, rec) in pairs if name in ANSWERS]
