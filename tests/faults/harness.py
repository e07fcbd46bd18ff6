"""The fault harness: a whole flashsale on real processes, an oversubscribed sale through the
HTTP edge (holds and payments on, a pre-queue when asked), one fault injected mid-sale, and
every promise checked afterwards from the topics and from PostgreSQL.

A scenario is a function of the running ``System`` that does its harm and says how it knows
it hit (``Hit``). ``run_sale`` drives the crowd, calls the fault when the given share of the
crowd has been answered, pays for the winners' holds until every order is settled, and
``verify`` checks the invariants and measures the recovery. Each verified run appends its
figures to ``.state/test/faults/results.jsonl`` (the closing notes' table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import psycopg

from flashsale import input_audit
from flashsale.sale_audit import audit_sale
from flashsale.settings import REPO_ROOT, Settings
from infra import processes
from infra.services import Service
from infra.stack import Endpoints
from producers.crowd import PlannedIntent
from producers.http.auth import token
from producers.http_crowd import CrowdResult, drive_crowd
from projections.catch_up import wait_until_projected
from projections.commands import live_name
from schemas.codec import SchemaRegistry
from tests.e2e.harness import SECRET, EdgeUnderTest, start_edge
from tests.integration.pipeline import Pipeline, start_pipeline

SKUS, ALLOCATION, PEOPLE = 2, 60, 700
HOLD_S, GRACE_S = 3.0, 1.0
SETTLE_TIMEOUT_S = 180.0
RESULTS = "faults/results.jsonl"  # under the test state dir


@dataclass
class Hit:
    """What a fault did, as the harness saw it: a scenario fills it in."""

    at_ms: int = 0  # wall clock when the fault began
    ended_ms: int = 0  # when the harm was undone (a restart, a resume), 0: at once
    detail: dict[str, Any] = field(default_factory=dict)


Fault = Callable[["System", "Sale"], Hit]


@dataclass
class System:
    """Every flashsale process of one private namespace, started by the harness."""

    pipeline: Pipeline
    edge: EdgeUnderTest
    services: dict[str, Service]
    extra: list[Worker] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.pipeline.settings

    @property
    def endpoints(self) -> Endpoints:
        return self.pipeline.endpoints

    @property
    def env(self) -> dict[str, str]:
        return self.pipeline.env

    def service(self, name: str) -> Service:
        return {"processor": self.pipeline.processor, "projector": self.pipeline.projector,
                **self.services}[name]  # fmt: skip

    def log_events(self, service: str, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of ``service`` naming ``event``."""
        try:
            lines = self.service(service).logfile.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in lines if x.startswith("{") and f'"{event}"' in x]


@dataclass
class Worker:
    """A further writer worker of the namespace (its own member id and state directory)."""

    system_env: dict[str, str]
    settings: Settings
    worker_id: int

    @property
    def pidfile(self) -> Any:
        return self.settings.state_dir / "run" / self.settings.namespace / f"w{self.worker_id}.pid"

    def start(self) -> int:
        run = self.settings.state_dir / "run" / self.settings.namespace
        datadir = (
            self.settings.state_dir / "processor" / f"{self.settings.namespace}-w{self.worker_id}"
        )
        env = {**os.environ, **self.system_env, "FLASHSALE_LOG_FORMAT": "json",
               "FLASHSALE_STATE_DIR": str(self.settings.state_dir),
               "FLASHSALE_NAMESPACE": self.settings.namespace,
               "FLASHSALE_WORKER_ID": str(self.worker_id),
               "FLASHSALE_PROCESSOR_DATADIR": str(datadir)}  # fmt: skip
        return processes.spawn([sys.executable, "-m", "flashsale.cli", "processor"],
                               run / f"w{self.worker_id}.log", self.pidfile, env=env)  # fmt: skip

    def pid(self) -> int | None:
        return processes.read_pid(self.pidfile)

    def stop(self) -> bool:
        return processes.stop_tracked(self.pid(), self.pidfile, grace=20.0)


@contextmanager
def whole_system(
    settings: Settings, endpoints: Endpoints, env: dict[str, str] | None = None, servers: int = 2
) -> Iterator[System]:
    """Writer, projector, analytics, sale clock, payments, nginx and ``servers`` app servers on
    a fresh namespace; everything is stopped afterwards, whatever happened."""
    pipeline = start_pipeline(settings, endpoints, f"fx{uuid.uuid4().hex[:8]}", env)
    services = {n: Service(n, pipeline.settings) for n in ("analytics", "clock", "payments")}
    edge: EdgeUnderTest | None = None
    system: System | None = None
    try:
        for s in services.values():
            s.start(pipeline.env)
        edge = start_edge(pipeline, servers)
        system = System(pipeline, edge, services)
        yield system
    finally:
        if edge is not None:
            edge.edge.down()
        for w in system.extra if system else []:
            w.stop()
        for s in services.values():
            s.stop()
        pipeline.stop()


@dataclass
class Sale:
    """An oversubscribed sale: who asks for what, and the answers they got."""

    sale_id: str
    skus: list[str]
    plan: list[PlannedIntent]
    tokens: dict[str, str]
    prequeue: bool
    crowd: CrowdResult | None = None
    live: CrowdResult | None = None  # the crowd's answers so far, while it runs
    hit: Hit | None = None
    answered_at_fault: int = 0
    facts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def plan_sale(prequeue: bool = False, people: int = PEOPLE) -> Sale:
    """``people`` people over ``SKUS`` SKUs of ``ALLOCATION`` each: most ask once, some ask
    for both SKUs or again with a new key (over the limit), one in twenty retries a request
    with its key. Three in ten never pay their hold, one in ten is declined."""
    uid = uuid.uuid4().hex[:8]
    sale_id = f"fx-{uid}"
    skus = [f"{sale_id}-s{n}" for n in range(SKUS)]
    plan: list[PlannedIntent] = []
    for n in range(people):
        kind = {0: "idle", 1: "idle", 2: "idle", 3: "decline"}.get(n % 10, "payer")
        user = f"{kind}-{n:05d}"
        plan.append(PlannedIntent(user, skus[n % SKUS], 1, f"a{n}"))
        if n % 3 == 0:
            plan.append(PlannedIntent(user, skus[(n + 1) % SKUS], 1, f"b{n}"))
        if n % 7 == 0:
            plan.append(PlannedIntent(user, skus[n % SKUS], 1, f"c{n}"))
        if n % 20 == 0:
            plan.append(PlannedIntent(user, skus[n % SKUS], 1, f"a{n}", retry=True))
    tokens = {p.user_id: token(p.user_id, "shopper", 3600, SECRET) for p in plan}
    return Sale(sale_id, skus, plan, tokens, prequeue)


def open_sale(system: System, sale: Sale, starts_in_s: float = -1.0) -> None:
    """Through the admin API, holds on (a waitlist too); with a pre-queue when the sale has one."""
    window: dict[str, Any] = {"starts_in_s": starts_in_s, "duration_s": 900, "hold_s": HOLD_S,
                              "pay_grace_s": GRACE_S, "waitlist_depth": 100}  # fmt: skip
    if sale.prequeue:
        window["prequeue_s"] = 120
    skus = [{"sku": s, "allocation": ALLOCATION, "per_user_limit": 1, "per_order_max": 1}
            for s in sale.skus]  # fmt: skip
    with httpx.Client(timeout=30) as client:
        system.edge.open_sale(client, sale.sale_id, skus, **window)


def run_sale(
    system: System,
    sale: Sale,
    fault: Fault | None,
    at: float = 0.4,
    concurrency: int = 16,
    pace_s: float = 0.02,
) -> Sale:
    """Drive the crowd (``concurrency`` senders, each waiting ``pace_s`` between requests);
    ``fault`` runs (in a thread of its own) once ``at`` of the crowd was answered; then pay
    for held orders until every order is settled. Returns the sale."""
    fired = threading.Event()
    done: list[Hit] = []
    errors: list[BaseException] = []

    def inject() -> None:
        try:
            done.append(fault(system, sale))  # type: ignore[misc]
        except BaseException as exc:
            errors.append(exc)

    injector = threading.Thread(target=inject, daemon=True)

    def progress(result: CrowdResult) -> None:
        sale.live = result
        if fault is not None and not fired.is_set() and result.answered >= at * len(sale.plan):
            fired.set()
            sale.answered_at_fault = result.answered
            injector.start()

    payer = Payer(system, sale)
    payer.start()
    sale.crowd = drive_crowd(system.edge.url, sale.sale_id, sale.plan, sale.tokens,
                             concurrency, progress, pace_s)  # fmt: skip
    if fault is not None:
        if not fired.is_set():  # the crowd finished between two progress calls
            sale.answered_at_fault = sale.crowd.answered
            injector.start()
        injector.join(timeout=300)
        assert not errors, f"the fault itself failed: {errors[0]!r}"
        assert done, "the fault did not finish in 300 s"
        sale.hit = done[0]
    sale.facts = payer.settle()
    return sale


class Payer(threading.Thread):
    """Pays each held order of a paying person as soon as it is accepted (declined for the
    "decline" people by the stub provider; "idle" people never pay, their holds expire)."""

    def __init__(self, system: System, sale: Sale) -> None:
        super().__init__(daemon=True)
        self.system, self.sale = system, sale
        self.stop = threading.Event()
        self.paid: set[str] = set()
        self.facts: list[tuple[str, dict[str, Any]]] = []
        self.failures: Counter[str] = Counter()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    self.facts = sale_facts(self.system, self.sale.sale_id)
                except Exception as exc:  # the broker away (a fault): read again next round
                    self.failures[type(exc).__name__] += 1
                for name, rec in self.facts:
                    if (
                        name == "IntentAccepted"
                        and rec["order_id"] not in self.paid
                        and (rec["user_id"].startswith("idle") or self._pay(client, rec))
                    ):
                        self.paid.add(rec["order_id"])
                time.sleep(0.5)

    def _pay(self, client: httpx.Client, rec: dict[str, Any]) -> bool:
        url = f"{self.system.edge.url}/v1/orders/{rec['order_id']}/pay"
        headers = {"Authorization": "Bearer " + self.sale.tokens[rec["user_id"]],
                   "Idempotency-Key": "fx-pay"}  # fmt: skip
        try:
            reply = client.post(url, headers=headers)
        except httpx.HTTPError as exc:  # an app server or nginx gone: try again next round
            self.failures[type(exc).__name__] += 1
            return False
        if reply.status_code >= 400:
            self.failures[str(reply.status_code)] += 1  # pending, or the edge is down
            return False
        return True

    def settle(self) -> list[tuple[str, dict[str, Any]]]:
        """Wait until every 202 intent is decided and no order is held any more."""
        queued = set(self.sale.crowd.queued.values()) if self.sale.crowd else set()
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            facts = self.facts
            decided = {r["intent_id"] for n, r in facts if n in ("IntentAccepted",
                                                                  "IntentRejected")}  # fmt: skip
            counts = Counter(n for n, _ in facts)
            settled = counts["OrderPaid"] + counts["HoldExpired"] + counts["HoldCancelled"]
            if queued <= decided and settled >= counts["IntentAccepted"] > 0:
                break
            time.sleep(0.5)
        self.stop.set()
        self.join(timeout=30)
        return sale_facts(self.system, self.sale.sale_id)


def sale_facts(system: System, sale_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The sale's committed facts, in log order, to the decision topic's end as of now."""
    msgs = input_audit.read_topic(system.endpoints.bootstrap, system.pipeline.names.decisions,
                                  True, 30)  # fmt: skip
    return [(name, rec)
            for _, _, name, rec in input_audit.decode_all(SchemaRegistry.load_default(), msgs)
            if name and rec.get("sale_id") == sale_id]  # fmt: skip


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
    assert audit.passed, [f"{v.kind}: {v.detail}" for v in audit.violations[:8]]
    decisions = Counter(r["intent_id"] for n, r in sale.facts
                        if n in ("IntentAccepted", "IntentRejected"))  # fmt: skip
    missing = queued - set(decisions)
    assert not missing, f"{len(missing)} intents answered 202 have no decision"
    assert max(decisions.values()) == 1, "an intent was decided twice"
    assert audit.inputs.unaccounted == [], "input offsets with no decision, repeat or letter"
    counts = Counter(n for n, _ in sale.facts)
    names_ = system.pipeline.names
    wait_until_projected(bootstrap, system.endpoints.dsn, live_name(system.settings),
                         (names_.decisions,), 120)  # fmt: skip
    with psycopg.connect(system.endpoints.dsn) as conn:
        rows = conn.execute(
            "SELECT sku, coalesce(sum(quantity) FILTER (WHERE status IN ('held', 'paying',"
            " 'paid', 'confirmed')), 0), coalesce(sum(quantity) FILTER (WHERE status IN"
            " ('held', 'paying')), 0) FROM orders WHERE sale_id = %s GROUP BY sku",
            (sale.sale_id,),
        ).fetchall()  # fmt: skip
    for sku, holding, _ in rows:
        assert holding <= ALLOCATION, f"{sku}: paid + held {holding} > {ALLOCATION}"
    ended = counts["OrderPaid"] + counts["HoldExpired"] + counts["HoldCancelled"]
    assert ended == counts["IntentAccepted"], "a hold never ended (paid or expired)"
    assert sum(r[2] for r in rows) == 0, "PostgreSQL still shows held orders the log ended"
    verdict = replay_verdict(system) if replay else "skipped"
    assert verdict in ("same", "skipped"), f"projections differ from a replay: {verdict}"
    in_flight, recover = recovery(system, sale)
    figures = Figures(
        scenario, len(sale.plan), len(queued), {str(k): v for k, v in sale.crowd.statuses.items()},
        len(decisions), counts["IntentAccepted"], counts["IntentRejected"], counts["OrderPaid"],
        counts["HoldExpired"], sum(r[2] for r in rows), ALLOCATION * len(sale.skus), in_flight,
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
    decided = input_audit.read_topic(bootstrap, names.decisions, True, 30)
    at = sale.hit.at_ms
    after = max(at, sale.hit.ended_ms)
    first_answer: dict[str, int] = {}  # intent id -> log time of its first answer
    first_after = None
    for m, (_, _, name, rec) in zip(decided, decode(registry, decided), strict=True):
        if name not in ("IntentAccepted", "IntentRejected", "EntryQueued", "Waitlisted"):
            continue
        t = m.timestamp()[1]
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


def now_ms() -> int:
    return int(time.time() * 1000)
