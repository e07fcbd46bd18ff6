"""The fault harness: a whole flashsale on real processes, an oversubscribed sale through the
HTTP edge (holds and payments on, a pre-queue when asked), one fault injected mid-sale, and
every promise checked afterwards from the topics and from PostgreSQL.

A scenario's fault (``Harm``) is a function of the running ``System`` and the ``Sale`` that
does its harm and says what it did (``Hit``). ``run_sale`` drives the crowd, does the harm
when the given share of the crowd has been answered, and pays for the winners' holds until
every order is settled; ``tests/faults/checks.py`` checks every invariant and measures the
recovery.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from flashsale.demo_orders import sale_facts
from flashsale.pseudonyms import KeyStore
from flashsale.settings import Settings
from infra import processes
from infra.services import ExtraWorker, Service
from infra.stack import Endpoints
from producers.crowd import PlannedIntent
from producers.http.auth import token
from producers.http_crowd import CrowdResult, drive_crowd
from tests.conftest import log_events
from tests.e2e.harness import SECRET, EdgeUnderTest, start_edge
from tests.integration.pipeline import Pipeline, start_pipeline

SKUS, ALLOCATION, PEOPLE = 2, 60, 700
HOLD_S, GRACE_S = 3.0, 1.0
SETTLE_TIMEOUT_S = 180.0
TROUBLE = ('"processor.crashed"', '"level": "error"', "Traceback", "[ERROR]", "[CRITICAL]")


@dataclass
class Hit:
    """What a fault did, as the harness saw it: a scenario fills it in."""

    at_ms: int = 0  # wall clock when the fault began
    ended_ms: int = 0  # when the harm was undone (a restart, a resume), 0: at once
    detail: dict[str, Any] = field(default_factory=dict)


Harm = Callable[["System", "Sale"], Hit]


@dataclass
class System:
    """Every flashsale process of one private namespace, started by the harness."""

    pipeline: Pipeline
    edge: EdgeUnderTest
    services: dict[str, Service]
    extra: list[ExtraWorker] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.pipeline.settings

    @property
    def endpoints(self) -> Endpoints:
        return self.pipeline.endpoints

    @property
    def env(self) -> dict[str, str]:
        return self.pipeline.env

    @property
    def run_dir(self) -> Path:
        """Where the namespace's processes write their logs and pid files."""
        return self.settings.state_dir / "run" / self.settings.namespace

    def troubles(self, limit: int = 12) -> list[str]:
        """The namespace's crash and error log lines, and which writer workers are alive: what
        a failed check prints, so a failure in CI says why without its logs."""
        found = []
        for path in sorted(self.run_dir.rglob("*.log")):  # the app servers' too
            for line in path.read_text(errors="replace").splitlines():
                if any(m in line for m in TROUBLE) and "__assignor-__leader" not in line:
                    found.append(f"{path.name}: {line[:300]}")
        workers = [("w0", self.pipeline.processor.pid())] + [
            (f"w{w.worker_id}", w.pid()) for w in self.extra
        ]
        up = [f"{n} {'alive' if p and processes.alive(p) else 'gone'}" for n, p in workers]
        return [", ".join(up), *found[-limit:]]

    def service(self, name: str) -> Service:
        return {"processor": self.pipeline.processor, "projector": self.pipeline.projector,
                **self.services}[name]  # fmt: skip

    def log_events(self, service: str, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of ``service`` logging ``event``."""
        return log_events(self.service(service).logfile, event)


@contextmanager
def whole_system(
    settings: Settings, endpoints: Endpoints, env: dict[str, str] | None = None, servers: int = 2
) -> Iterator[System]:
    """Writer, projector, analytics, sale clock, payments, nginx and ``servers`` app servers on
    a fresh namespace; everything is stopped afterwards, whatever happened."""
    with ExitStack() as stack:  # each stop runs, whatever the others raised
        pipeline = start_pipeline(settings, endpoints, f"fx{uuid.uuid4().hex[:8]}", env)
        stack.callback(pipeline.stop)
        services = {n: Service(n, pipeline.settings) for n in ("analytics", "clock", "payments")}
        for s in services.values():
            stack.callback(s.stop)
            s.start(pipeline.env)
        extra: list[ExtraWorker] = []
        stack.callback(lambda: [w.stop() for w in extra])
        edge = start_edge(pipeline, servers)
        stack.callback(edge.edge.down)
        yield System(pipeline, edge, services, extra)


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
    alias: dict[str, str] = field(default_factory=dict)  # person -> pseudonym in the log


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
    fault: Harm | None,
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

    sale.alias = KeyStore(system.endpoints.dsn, system.settings.namespace).pseudonyms(
        p.user_id for p in sale.plan
    )
    payer = Payer(system, sale)
    payer.start()
    try:
        sale.crowd = drive_crowd(system.edge.url, sale.sale_id, sale.plan, sale.tokens,
                                 concurrency, progress, pace_s)  # fmt: skip
        if fault is not None and not fired.is_set():  # done between two progress calls
            fired.set()
            sale.answered_at_fault = sale.crowd.answered
            injector.start()
    except BaseException:
        payer.stop.set()
        payer.join(timeout=30)
        raise
    finally:  # a fault half-done (a server stopped) is finished before anything is stopped
        if injector.is_alive():
            injector.join(timeout=300)
    if fault is not None:
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
        self.people = {a: u for u, a in sale.alias.items()}  # the log names pseudonyms

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    self.facts = facts_of(self.system, self.sale.sale_id)
                except Exception as exc:  # the broker away (a fault): read again next round
                    self.failures[type(exc).__name__] += 1
                for name, rec in self.facts:
                    if (
                        name == "IntentAccepted"
                        and rec["order_id"] not in self.paid
                        and (
                            self.people[rec["user_id"]].startswith("idle") or self._pay(client, rec)
                        )
                    ):
                        self.paid.add(rec["order_id"])
                time.sleep(0.5)

    def _pay(self, client: httpx.Client, rec: dict[str, Any]) -> bool:
        url = f"{self.system.edge.url}/v1/orders/{rec['order_id']}/pay"
        headers = {"Authorization": "Bearer " + self.sale.tokens[self.people[rec["user_id"]]],
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
        return facts_of(self.system, self.sale.sale_id)


def facts_of(system: System, sale_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The sale's committed facts, in log order, to the decision topic's end as of now."""
    return sale_facts(system.endpoints.bootstrap, system.pipeline.names.decisions, sale_id)


def now_ms() -> int:
    return int(time.time() * 1000)
