"""`flashsale bench --only autoscale`: one burst, three ways, side by side in one run.

The same open-loop burst (quiet, a burst, quiet again) goes through nginx to the edge four
times, each on a sale of its own: with one app server fixed; with the autoscaler running
(from one server: 1-3 servers, 1-2 writer workers, a sample a second); with the autoscaler
told to ignore the host's idle cores (``headroom`` 0: what it did before that rule); and
with three servers fixed. Before each run the host must be idle (the last burst's backlog in
the writer and the projector worked off), or the runs would measure each other. Each run
records per second what was offered, answered ``202``
and its p99, and the autoscaler's samples (servers, workers, app CPU, request rate, writer
lag, the host's idle cores) and decisions. Written to ``bench-results/autoscale.json`` and
drawn in ``autoscale.png``. Figures, never asserted: on two cores, more app servers share the
same two cores with nginx, Kafka, the writer and the load generator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from flashsale.settings import Settings
from infra import autoscale
from infra.autoscale_policy import Bounds, Decision, Policy, Sample
from producers import load

NAMES = ("fixed_1_server", "autoscaled", "autoscaled_ignoring_headroom", "fixed_3_servers")
QUIET, BURST = 100, 3000  # intents/s
PHASES = ((15.0, QUIET), (40.0, BURST), (30.0, QUIET))  # (seconds, rate)
SMOKE = ((3.0, QUIET), (5.0, 500), (3.0, QUIET))
POLICY = Policy(servers=Bounds(1, 3), workers=Bounds(1, 2), sustain=2, cooldown_s=8)


def settle(idle_cores: float = 1.5, timeout_s: float = 300.0) -> float:
    """Wait until the host has ``idle_cores`` idle for 3 s in a row (the writer and the
    projector have worked off the last burst); the seconds waited."""
    host, began, calm = autoscale.HostCpu(), time.monotonic(), 0
    while calm < 3 and time.monotonic() - began < timeout_s:
        time.sleep(1)
        calm = calm + 1 if host.idle_cores() >= min(idle_cores, (os.cpu_count() or 2) - 0.5) else 0
    return round(time.monotonic() - began, 1)


def plan_of(phases: tuple[tuple[float, int], ...], users: int) -> load.Plan:
    """Even arrivals at each phase's rate, one phase after the other."""
    at: list[float] = []
    t0 = 0.0
    for seconds, rate in phases:
        at += [t0 + i / rate for i in range(int(seconds * rate))]
        t0 += seconds
    return load.Plan(at, [i % users for i in range(len(at))], ["b1"] * len(at))


def _variant(settings: Settings, url: str, sale: str, tokens: list[str],
             phases: tuple[tuple[float, int], ...], policy: Policy,
             servers: int) -> dict[str, Any]:  # fmt: skip
    """One run of the burst; ``servers`` fixed beforehand (the autoscaler then samples)."""
    fleet = autoscale.Fleet(settings)
    for _ in range(servers - len(fleet.servers)):
        fleet.add_server()
    samples: list[tuple[Sample, list[Decision]]] = []
    stop = threading.Event()
    scaler = threading.Thread(target=autoscale.run, daemon=True,
                              args=(settings, policy, 1.0, stop,
                                    lambda s, ds: samples.append((s, ds))))  # fmt: skip
    scaler.start()
    time.sleep(2.5)  # two samples before the load: rates from the first one on
    plan = plan_of(phases, len(tokens))
    tally = load.Tally(timeline=[])
    began = time.monotonic()
    asyncio.run(load.http_run(url, f"/v1/sales/{sale}/intents", tokens, plan, tally))
    stop.set()
    scaler.join(timeout=120)
    fleet.restore()
    return _figures(plan, tally, samples, began, phases)


def _figures(plan: load.Plan, tally: load.Tally, samples: list[tuple[Sample, list[Decision]]],
             began: float, phases: tuple[tuple[float, int], ...]) -> dict[str, Any]:  # fmt: skip
    offered: dict[int, int] = defaultdict(int)
    for at in plan.at:
        offered[int(at)] += 1
    ok: dict[int, list[float]] = defaultdict(list)
    other: dict[int, int] = defaultdict(int)
    for at, outcome, seconds in tally.timeline or ():
        if outcome == "202":
            ok[int(at)].append(seconds)
        else:
            other[int(at)] += 1
    span = int(plan.at[-1]) + 1
    burst = range(int(phases[0][0]), int(phases[0][0] + phases[1][0]))
    in_burst = sorted(x for s in burst for x in ok[s])
    series: dict[str, list[Any]] = {
        "t": list(range(span)),
        "offered": [offered[s] for s in range(span)],
        "ok": [len(ok[s]) for s in range(span)],
        "not_ok": [other[s] for s in range(span)],
        "p99_ms": [load.percentiles(ok[s], (99.0,))["latency_ms_p99"] for s in range(span)],
    }
    scaled: list[dict[str, Any]] = [
        {"t": round(s.at - began, 1), "servers": s.servers, "workers": s.workers,
         "cpu": round(s.server_cpu, 3), "rps": round(s.requests_per_s), "lag": s.lag,
         "host_idle": round(s.host_idle, 2),
         "decisions": [f"{d.kind} {d.step:+d} -> {d.to}: {d.reason}" for d in ds]}
        for s, ds in samples
    ]  # fmt: skip
    return {
        "answered_202": sum(series["ok"]),
        "not_202": {k: v for k, v in tally.outcomes.items() if k != "202"},
        **{f"burst_{k}": v for k, v in load.percentiles(in_burst).items()},
        "burst_202_per_s": round(len(in_burst) / len(burst)),
        "max_servers": max((s.servers for s, _ in samples), default=None),
        "max_workers": max((s.workers for s, _ in samples), default=None),
        "decisions": [x for row in scaled for x in row["decisions"]],
        "series": series,
        "samples": scaled,
    }


def run(settings: Settings, edge_url: str, secret: str, out: Path,
        phases: tuple[tuple[float, int], ...] = PHASES) -> dict[str, Any]:  # fmt: skip
    """The three variants; the JSON and the chart written next to each other."""
    from producers.http.auth import token
    from producers.http.bench import open_sale

    users = 5000
    tokens = [token(f"as-{i}", "shopper", 3600, secret) for i in range(users)]
    fixed = {n: Policy(servers=Bounds(n, n), workers=Bounds(1, 1)) for n in (1, 3)}
    results: dict[str, Any] = {
        "phases": [{"seconds": s, "rate": r} for s, r in phases],
        "policy": {
            "servers": "1-3",
            "workers": "1-2",
            "interval_s": 1.0,
            "sustain": POLICY.sustain,
            "cooldown_s": POLICY.cooldown_s,
            "cpu_high": POLICY.cpu_high,
            "rps_high": POLICY.rps_high,
            "lag_high": POLICY.lag_high,
            "headroom": POLICY.headroom,
        },
        "cores": os.cpu_count(),
    }
    blind = dataclasses.replace(POLICY, headroom=0.0)  # as if the host had cores to spare
    settled: dict[str, float] = {}
    for name, policy, servers in (("fixed_1_server", fixed[1], 1), ("autoscaled", POLICY, 1),
                                  ("autoscaled_ignoring_headroom", blind, 1),
                                  ("fixed_3_servers", fixed[3], 3)):  # fmt: skip
        settled[name] = settle()  # the last run's backlog (writer, projector) is done
        sale = f"autoscale-{name.replace('_', '-')}-{int(time.time())}"
        open_sale(edge_url, secret, sale)
        results[name] = _variant(settings, edge_url, sale, tokens, phases, policy, servers)
    results["settle_s"] = settled
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps(results, indent=2))
    chart(results, out.with_suffix(".png"))
    return results


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = NAMES
    fig, (rate, p99, fleet) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    first = results[names[0]]["series"]
    rate.plot(first["t"], first["offered"], "k--", label="offered")
    for name in names:
        s = results[name]["series"]
        rate.plot(s["t"], s["ok"], label=f"202/s {name}")
        p99.plot(s["t"], [v if v is not None else float("nan") for v in s["p99_ms"]], label=name)
    rate.set_ylabel("intents/s")
    rate.legend(fontsize=8)
    p99.set_ylabel("p99 ms (POST to 202)")
    p99.set_yscale("log")
    p99.legend(fontsize=8)
    for name, style in (("autoscaled", "-"), ("autoscaled_ignoring_headroom", "--")):
        samples = results[name]["samples"]
        t = [x["t"] for x in samples]
        fleet.step(t, [x["servers"] for x in samples], style, where="post",
                   label=f"app servers, {name}")  # fmt: skip
        fleet.step(t, [x["workers"] for x in samples], style, where="post",
                   label=f"writer workers, {name}")  # fmt: skip
    samples = results["autoscaled"]["samples"]
    idle = fleet.twinx()
    idle.plot([x["t"] for x in samples], [x["host_idle"] for x in samples], "r:",
              label="host idle cores (autoscaled)")  # fmt: skip
    idle.set_ylabel("idle cores")
    fleet.set_ylabel("count")
    fleet.set_xlabel("seconds since the load began")
    fleet.legend(loc="upper left", fontsize=7)
    idle.legend(loc="upper right", fontsize=7)
    fig.suptitle(
        "One burst through nginx on 2 cores: 1 app server fixed, autoscaled (1-3; with "
        "and without the idle-core rule), 3 fixed"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
