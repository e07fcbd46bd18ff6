"""`flashsale bench`: the writer (flashsale/writer_bench.py) and the edge, on real servers.

Figures are printed and written to bench-results/*.json; nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flashsale.settings import Settings
from infra.stack import Stack
from processors.writer import PartitionWriter, Replayed
from schemas.codec import SchemaRegistry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `bench` command."""
    p = sub.add_parser("bench", help="benchmark the writer and the edge; writes bench-results/")
    p.add_argument("--intents", type=int, default=100_000, help="backlog size per scenario")
    p.add_argument(
        "--restart-intents",
        type=int,
        default=1_000_000,
        help="decided intents in state before the restart measurement",
    )
    p.add_argument(
        "--failover-intents",
        type=int,
        default=200_000,
        help="intents decided by two workers before one is killed (failover)",
    )
    p.add_argument("--seconds", type=int, default=10, help="length of the latency run")
    p.add_argument("--only", default="all",
                   choices=["all", "core", "failover", "http", "autoscale", "compare"])  # fmt: skip
    p.add_argument("--compare", action="store_const", dest="only", const="compare",
                   help="only the comparison with PostgreSQL and Redis")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the bench runs")
    p.add_argument("--out", help="the JSON of the part run alone (core by default; with "
                   "--compare, the comparison; charts next to it)")  # fmt: skip
    p.add_argument("--core-out", default="bench-results/core.json")
    p.add_argument("--failover-out", default="bench-results/failover.json")
    p.add_argument("--autoscale-out", default="bench-results/autoscale.json")
    p.add_argument("--http-out", default="bench-results/http.json")
    p.add_argument("--compare-out", default="bench-results/compare.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run every scenario and report; stop the servers if this command started them."""
    if args.smoke:
        args.intents, args.restart_intents, args.seconds = 2_000, 5_000, 2
        args.failover_intents = 2_000
    if args.out:  # the part run alone writes where --out says
        part = {
            "core": "core_out",
            "http": "http_out",
            "compare": "compare_out",
            "failover": "failover_out",
            "autoscale": "autoscale_out",
        }
        setattr(args, part.get(args.only, "core_out"), args.out)
    stack = Stack(settings)
    started = stack.up()
    try:
        if args.only in ("all", "core"):
            core(args, settings, stack)
        if args.only in ("all", "failover"):
            failover(args, settings, stack)
        if args.only in ("all", "http"):
            http(args, settings)
        if args.only in ("all", "autoscale"):
            autoscaled(args, settings)
        if args.only in ("all", "compare") and not compare(args, settings, stack):
            return 1  # a system failed: its error is in the table and the JSON
    finally:
        if any(started.values()):
            stack.down()
    return 0


@contextlib.contextmanager
def _edge_stack(settings: Settings, servers: int | None = None) -> Iterator[tuple[Any, list[Any]]]:
    """The writer, the projector and the HTTP edge (nginx, ``servers`` app servers, by default
    as configured) up for a bench, and stopped afterwards: whatever fails to start, what did
    start is stopped."""
    from infra.edge import Edge
    from infra.services import all_services

    # The analytics projection is measured by the projection bench; left out here, the edge's
    # figures stay comparable with those measured before it existed.
    services = [s for s in all_services(settings) if s.name != "analytics"]
    started: list[Any] = []
    edge = Edge(settings, servers)
    edge_started: dict[str, bool] = {}
    try:
        for service in services:  # recorded one by one: a later failure stops the earlier
            if service.start():
                started.append(service)
        edge_started = edge.up()
        yield edge, services
    finally:
        if any(edge_started.values()):
            edge.down()
        for service in reversed(started):
            service.stop()


def http(args: argparse.Namespace, settings: Settings) -> None:
    """The HTTP edge through nginx: max 202/s (wrk) and latency at a fixed offered rate."""
    from producers.http.bench import run_http_bench

    with _edge_stack(settings) as (edge, services):
        figures = run_http_bench(settings, edge, services, rate=2000)
    _show("HTTP edge through nginx (2 app servers)", _flat(figures))
    out = Path(args.http_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"written to {out}")


def autoscaled(args: argparse.Namespace, settings: Settings) -> None:
    """One burst: one app server fixed, autoscaled from one, three fixed (side by side)."""
    from flashsale import autoscale_bench
    from producers.http.auth import load_secret
    from producers.http.config import EdgeSettings

    with _edge_stack(settings, servers=1) as (edge, _):  # one to start; the runs add more
        secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret).secret
        out = Path(args.autoscale_out)
        phases = autoscale_bench.SMOKE if args.smoke else autoscale_bench.PHASES
        figures = autoscale_bench.run(settings, edge.url, secret, out, phases)
    for name in autoscale_bench.NAMES:
        _show(
            f"a burst ({phases[1][1]}/s for {phases[1][0]:g} s), {name}",
            {k: v for k, v in figures[name].items() if k not in ("series", "samples")},
        )
    print(f"written to {out} and {out.with_suffix('.png')}")


def compare(args: argparse.Namespace, settings: Settings, stack: Stack) -> bool:
    """flashsale against a PostgreSQL row lock and Redis + Lua (flashsale/compare_bench.py)."""
    from rich.console import Console

    from flashsale import compare_bench, compare_charts

    settings = dataclasses.replace(settings, kafka_bootstrap=stack.endpoints().bootstrap)
    # The project's own servers (started by this command or by `make up`): their pids give CPU.
    broker, postmaster = stack.kafka.pid(), stack.postgres.pid()
    if postmaster is None:
        raise SystemExit(
            "bench --only compare needs the project's own PostgreSQL (`make up`): it runs the "
            "PostgreSQL baseline there and reads its CPU"
        )
    sizes = compare_bench.SMOKE if args.smoke else compare_bench.Sizes()
    dsn = stack.endpoints().dsn

    def over_http() -> dict[str, Any]:
        """In a namespace of its own (topics, writer, projector, an edge on free ports), all
        removed afterwards; PostgreSQL's tables are shared, keyed by the bench's sale ids."""
        import shutil

        from flashsale import compare_http
        from flashsale.writer_bench import Namespace
        from infra.edge import Edge
        from infra.processes import free_port

        ns = Namespace(settings, "http", broker, services=("processor", "projector"))
        state = ns.settings.state_dir / "bench" / ns.settings.namespace
        edge = Edge(dataclasses.replace(ns.settings, state_dir=state, http_port=free_port()),
                    server_ports=[free_port(), free_port()], env=ns.env)  # fmt: skip
        try:
            ns.start()
            ns.wait_ready()  # a sale opened before the writer decides would time out
            edge.up()  # stops what it started if a server fails to start
            return compare_http.run(ns.settings, dsn, edge, sizes.seconds,
                                    sizes.latency_seconds, sizes.oversubscribed,
                                    sizes.http_users)  # fmt: skip
        finally:
            edge.down()
            ns.drop()
            shutil.rmtree(state, ignore_errors=True)

    figures = compare_bench.run(settings, broker, postmaster, sizes, over_http)
    Console(width=max(Console().width, 180)).print(compare_bench.table(figures))
    print("machine:", figures["machine"], " ratios:", figures["ratios"])
    out = Path(args.compare_out)
    compare_bench.write(figures, out)
    charts = compare_charts.write(figures, out)
    print(f"written to {out} and {', '.join(str(c) for c in charts)}")
    return not any("error" in s for s in figures["systems"].values())


def _flat(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def core(args: argparse.Namespace, settings: Settings, stack: Stack) -> None:
    """One worker: in-process cost, backlogs, latency at half the max, projection, restart."""
    from flashsale import projection_bench
    from flashsale import writer_bench as wb

    settings = dataclasses.replace(settings, kafka_bootstrap=stack.endpoints().bootstrap)
    broker = stack.kafka.pid() if settings.infra_mode == "local" else None
    n = args.intents
    results: dict[str, Any] = {
        "setup": {
            "workers": 1,
            "guarantee": "exactly_once",
            "commit_interval_ms": wb.commit_interval_ms(),
            "partitions": settings.partitions,
            "cores": os.cpu_count(),
        },
        "in_process": in_process(min(n, 50_000)),
    }
    _show("in-process PartitionWriter (decode + decide + encode, no broker)", results["in_process"])
    for mix, skus in (("accept-heavy", 1), ("accept-heavy", 1000), ("oversubscribed", 1),
                      ("oversubscribed", 1000), ("accept-heavy-holds", 1)):  # fmt: skip
        label = f"backlog_{mix}_{skus}_sku"
        results[label] = wb.backlog(settings, broker, n, skus, mix)
        _show(f"backlog of {n} intents, {mix}, {skus} SKU(s), one worker", results[label])
    best = results["backlog_accept-heavy_1000_sku"]["decisions_per_s"] or 1000
    rate = max(100, best // 2)
    results["latency_at_half_max"] = wb.latency(settings, broker, rate, args.seconds)
    _show(f"latency at {rate} intents/s offered (half the 1,000-SKU maximum)",
          results["latency_at_half_max"])  # fmt: skip
    results["projection"] = projection_bench.projection(settings, stack.endpoints().dsn, broker, n)
    _show(f"projection and audit of a {n}-intent sale from offset 0", results["projection"])
    results["restart"] = wb.restart(settings, broker, args.restart_intents)
    _show(f"restart with {args.restart_intents} decided intents in state", results["restart"])
    out = Path(args.core_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


def failover(args: argparse.Namespace, settings: Settings, stack: Stack) -> None:
    """Two workers, one SIGKILLed: takeover without and with standby replicas."""
    from flashsale import failover_bench

    settings = dataclasses.replace(settings, kafka_bootstrap=stack.endpoints().bootstrap)
    broker = stack.kafka.pid() if settings.infra_mode == "local" else None
    results = failover_bench.failover(settings, broker, args.failover_intents)
    for variant, figures in results.items():
        _show(f"failover of {args.failover_intents} decided intents, {variant}", figures)
    out = Path(args.failover_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


def _show(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}")
    for key, value in figures.items():
        print(f"  {key:<36} {value}")


def in_process(n: int) -> dict[str, Any]:
    """Decode + decide + encode + state delta through PartitionWriter, no broker: CPU µs each."""
    registry = SchemaRegistry.load_default()
    writer = PartitionWriter(registry, 0)
    now = int(time.time() * 1000)
    opened = registry.encode("OpenSale", {
        "event_id": "e", "correlation_id": None, "producer": "bench", "occurred_at": now,
        "sale_id": "s", "sku": "hot", "allocation": n, "per_user_limit": n,
        "per_order_max": 2, "starts_at": now - 1000, "ends_at": now + 3_600_000})  # fmt: skip
    writer.handle_batch([Replayed(0, b"hot", opened, now)], None)
    values = [
        registry.encode(
            "PurchaseIntent",
            {
                "event_id": f"e{i}",
                "correlation_id": f"i{i}",
                "producer": "bench",
                "occurred_at": now,
                "intent_id": f"{i:032x}",
                "idempotency_key": f"k{i}",
                "user_id": f"u{i % 5000}",
                "sale_id": "s",
                "sku": "hot",
                "quantity": 1,
            },
        )
        for i in range(n)
    ]
    records = [Replayed(i + 1, b"hot", v, now) for i, v in enumerate(values)]
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, n, 2000):
        writer.handle_batch(records[i : i + 2000], None)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"decisions": n, "decisions_per_s": round(n / elapsed),
            "cpu_us_per_decision": round(cpu / n * 1e6, 1)}  # fmt: skip
