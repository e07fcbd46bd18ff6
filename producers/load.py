"""`flashsale load`: the load generator on its own. Open-loop arrivals (each request leaves
at its scheduled time whether or not earlier ones were answered; latency counts from that
time, so a slow system cannot slow the offered load down and hide its own queueing) at a set
rate, or a burst of N at once, over HTTP through the edge or straight to Kafka.

The seed fixes who sends when (arrival gaps, users, SKUs); idempotency keys are fresh on
every run (a repeated key would be answered from the edge's cache, not written again). Its
own CPU per request is reported: a generator that eats the cores it shares with the system
shows up here.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashsale import intent_sig
from flashsale.settings import SettingError, Settings

QUANTILES = (50.0, 99.0, 99.9)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Who sends what when: ``at`` seconds from the start, a user index and a SKU each."""

    at: list[float]
    users: list[int]
    skus: list[str]

    @classmethod
    def make(cls, seed: int, rate: float, seconds: float, burst: int, users: int,
             skus: list[str], arrival: str = "poisson") -> Plan:  # fmt: skip
        """``burst`` > 0: that many at time 0; otherwise ``rate``/s for ``seconds``, with
        exponential gaps (``poisson``) or even ones (``uniform``)."""
        rng = random.Random(seed)
        if burst > 0:
            at = [0.0] * burst
        else:
            n = int(rate * seconds)
            if arrival == "uniform":
                at = [i / rate for i in range(n)]
            else:
                t, at = 0.0, []
                for _ in range(n):
                    at.append(t)
                    t += rng.expovariate(rate)
        return cls(at, [rng.randrange(users) for _ in at], [rng.choice(skus) for _ in at])


@dataclasses.dataclass
class Tally:
    """What came back: answers by outcome, latencies (s) of the successful ones."""

    sent: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)
    lags: list[float] = dataclasses.field(default_factory=list)  # sends behind schedule (s)
    scheduled_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # intent -> wall
    # (scheduled s from the start, outcome, latency s) per answer, when asked for (a timeline)
    timeline: list[tuple[float, str, float]] | None = None

    @property
    def answered(self) -> int:
        return sum(self.outcomes.values())


def percentiles(seconds: list[float], qs: tuple[float, ...] = QUANTILES) -> dict[str, float | None]:
    """``latency_ms_p50`` etc. (nearest rank) of latencies in seconds; None when empty."""
    ordered = sorted(seconds)
    out: dict[str, float | None] = {}
    for q in qs:
        name = f"latency_ms_p{q:g}".replace(".", "")  # p50, p99, p999
        if not ordered:
            out[name] = None
            continue
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered) / 100 - 1e-9) - 1))
        out[name] = round(ordered[rank] * 1000, 2)
    return out


def summary(plan: Plan, tally: Tally, wall: float, cpu: float, ok: str) -> dict[str, Any]:
    """The figures of one run (``ok``: the outcome whose latency counts, e.g. ``202``)."""
    offered = len(plan.at) / plan.at[-1] if len(plan.at) > 1 and plan.at[-1] > 0 else None
    return {
        "sent": tally.sent,
        "offered_per_s": round(offered) if offered else None,
        "answered_ok_per_s": round(tally.outcomes[ok] / wall) if wall > 0 else None,
        "outcomes": dict(tally.outcomes),
        **percentiles(tally.latencies),
        "latency_ms_max": round(max(tally.latencies) * 1000, 2) if tally.latencies else None,
        "seconds": round(wall, 2),
        # A generator behind its schedule: its own lag is in the latencies above.
        "send_lag_ms_p99": percentiles(tally.lags, (99.0,))["latency_ms_p99"],
        "loadgen_cpu_us_per_request": round(cpu / tally.sent * 1e6, 1) if tally.sent else None,
    }


async def http_run(url: str, path: str, tokens: list[str], plan: Plan, tally: Tally,
                   connections: int = 512, timeout_s: float = 30.0) -> None:  # fmt: skip
    """POST each planned intent through ``url`` at its time (``tokens`` indexed by user); an
    answer later than ``timeout_s`` counts as the outcome ``timeout``."""
    from producers.loadgen import RawClient

    client = RawClient(url, connections)
    run = uuid.uuid4().hex[:10]
    bodies = {s: json.dumps({"sku": s, "quantity": 1}).encode() for s in set(plan.skus)}

    def answered(outcome: str, scheduled: float) -> None:
        tally.outcomes[outcome] += 1
        if tally.timeline is not None:
            tally.timeline.append((scheduled - start, outcome, time.perf_counter() - scheduled))

    async def one(i: int, scheduled: float) -> None:
        headers = {"Authorization": "Bearer " + tokens[plan.users[i]],
                   "Idempotency-Key": f"{run}-{i}", "Content-Type": "application/json"}  # fmt: skip
        try:
            answer = await asyncio.wait_for(
                client.request("POST", path, headers, bodies[plan.skus[i]]), timeout_s
            )
        except (OSError, asyncio.IncompleteReadError) as exc:  # after the client's one retry
            answered(type(exc).__name__, scheduled)  # (a timeout too: TimeoutError is an OSError)
            return
        answered(str(answer.status), scheduled)
        if answer.status == 202:
            tally.latencies.append(time.perf_counter() - scheduled)
            intent = json.loads(answer.body)["intent_id"]
            tally.scheduled_ms[intent] = (wall0 + scheduled - start) * 1000

    start, wall0 = time.perf_counter(), time.time()
    tasks = []
    for i, at in enumerate(plan.at):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tally.lags.append(time.perf_counter() - start - at)
        tasks.append(asyncio.create_task(one(i, start + at)))
        tally.sent += 1
    await asyncio.gather(*tasks)
    await client.close()


def encode_plan(bootstrap: str, topic: str, sale: str, plan: Plan) -> list[bytes]:
    """The planned PurchaseIntents, encoded before the clock starts (fresh keys)."""
    from producers.commands import CommandProducer

    encoder = CommandProducer(bootstrap, "flashsale-load", topic=topic)
    run = uuid.uuid4().hex[:10]
    try:
        return [encoder.encode_intent(sale, plan.skus[i], f"load-{u}", 1, f"{run}-{i}")
                for i, u in enumerate(plan.users)]  # fmt: skip
    finally:
        encoder.close()


def kafka_run(bootstrap: str, topic: str, values: list[bytes], plan: Plan, tally: Tally,
              linger_ms: int = 2) -> None:  # fmt: skip
    """Produce each planned PurchaseIntent (``values``) at its time (acks=all, idempotent);
    latency is scheduled time to the broker's acknowledgement."""
    from flashsale.kafka_auth import Producer
    from producers.commands import producer_config

    producer = Producer({**producer_config(bootstrap), "linger.ms": linger_ms})
    producer.list_topics(topic, timeout=10)  # connected, metadata known: not in the first latency
    stop = threading.Event()

    def serve() -> None:  # delivery reports arrive here while the sender sleeps
        while not stop.is_set():
            producer.poll(0.005)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    start = time.perf_counter()

    def report(scheduled: float) -> Callable[[Any, Any], None]:
        def done(err: Any, _msg: Any) -> None:
            if err is None:
                tally.outcomes["acked"] += 1
                tally.latencies.append(time.perf_counter() - scheduled)
            else:
                tally.outcomes[str(err.name())] += 1

        return done

    for i, at in enumerate(plan.at):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        tally.lags.append(time.perf_counter() - start - at)
        key = plan.skus[i].encode()
        while True:
            try:
                producer.produce(topic, values[i], key=key, on_delivery=report(start + at),
                                 headers=intent_sig.headers(values[i]))  # fmt: skip
                break
            except BufferError:  # the local queue is full: the broker is behind
                time.sleep(0.001)
        tally.sent += 1
    producer.flush(60)
    stop.set()
    server.join()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `load` command."""
    p = sub.add_parser("load", help="open-loop load: intents at a set rate or a burst")
    p.add_argument("target", choices=["http", "kafka"],
                   help="http: POST through the edge; kafka: to the command topic")  # fmt: skip
    p.add_argument("--sale", required=True, help="an open sale")
    p.add_argument("--sku", action="append", required=True, help="SKU (repeat for several)")
    p.add_argument("--rate", type=float, default=1000.0, help="intents per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--burst", type=int, default=0, help="send this many at once instead")
    p.add_argument("--arrival", choices=["poisson", "uniform"], default="poisson")
    p.add_argument("--users", type=int, default=5000, help="distinct shoppers")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--url", help="the edge (http; default: the local nginx)")
    p.add_argument("--json", help="also write the summary to this file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the planned load with a progress bar; print (and optionally write) the summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if args.burst < 0 or args.rate <= 0 or args.seconds <= 0 or args.users < 1:
        print("flashsale load: --rate, --seconds and --users must be > 0, --burst >= 0")
        return 2
    plan = Plan.make(args.seed, args.rate, args.seconds, args.burst, args.users, args.sku,
                     args.arrival)  # fmt: skip
    if not plan.at:
        print("flashsale load: the plan is empty (rate x seconds < 1)")
        return 2
    tally = Tally()
    work, ok = _target(args, settings, plan, tally)
    cpu0, t0 = time.process_time(), time.perf_counter()
    worker = threading.Thread(target=work, daemon=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("answered {task.fields[answered]}"),
                  console=Console(stderr=True)) as bar:  # fmt: skip
        task = bar.add_task(f"{args.target} load", total=len(plan.at), answered=0)
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            bar.update(task, completed=tally.sent, answered=tally.answered)
    s = summary(plan, tally, time.perf_counter() - t0, time.process_time() - cpu0, ok)
    Console().print_json(data=s)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    return 0 if tally.outcomes[ok] else 1


def _target(args: argparse.Namespace, settings: Settings, plan: Plan,
            tally: Tally) -> tuple[Callable[[], None], str]:  # fmt: skip
    """The run of the chosen target, and the outcome that counts as answered."""
    from flashsale.topics import TopicNames
    from infra.stack import Stack

    if args.target == "kafka":
        from flashsale.kafka_auth import AdminClient

        bootstrap = Stack(settings).endpoints().bootstrap
        topic = TopicNames.of(settings).sku_commands
        known = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        if topic not in known:
            raise SettingError(f"topic {topic} does not exist: start the stack (`make up`) "
                               "for this namespace first")  # fmt: skip
        values = encode_plan(bootstrap, topic, args.sale, plan)
        return (lambda: kafka_run(bootstrap, topic, values, plan, tally)), "acked"
    from producers.http.auth import load_secret, token
    from producers.http.config import EdgeSettings

    secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
    tokens = [token(f"load-{u}", "shopper", 3600, secret) for u in range(args.users)]
    url = args.url or f"http://127.0.0.1:{settings.http_port}"
    path = f"/v1/sales/{args.sale}/intents"
    return (lambda: asyncio.run(http_run(url, path, tokens, plan, tally))), "202"
