"""`flashsale bench`: how fast one inventory worker decides, measured on the real broker.

Figures are printed and written to bench-results/core.json; nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from flashsale.settings import Settings, env_int
from flashsale.topics import TopicNames, catalogue
from infra import provision
from infra.services import Service
from infra.stack import Stack
from processors.writer import SkuWriter
from producers.commands import CommandProducer, SkuAllocation
from schemas.codec import SchemaRegistry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `bench` command."""
    p = sub.add_parser("bench", help="benchmark one inventory worker; writes bench-results/")
    p.add_argument("--intents", type=int, default=30_000, help="backlog size per scenario")
    p.add_argument("--rate", type=int, default=5_000, help="offered intents/s for the latency run")
    p.add_argument(
        "--sustainable-rate",
        type=int,
        default=400,
        help="a rate one worker keeps up with, for an unsaturated latency figure",
    )
    p.add_argument("--seconds", type=int, default=10, help="length of the latency run")
    p.add_argument("--only", choices=["all", "core", "http"], default="all")
    p.add_argument("--out", default="bench-results/core.json")
    p.add_argument("--http-out", default="bench-results/http.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run every scenario and report."""
    stack = Stack(settings)
    stack.up()
    if args.only in ("all", "core"):
        core(args, settings, stack.endpoints().bootstrap)
    if args.only in ("all", "http"):
        http(args, settings)
    return 0


def http(args: argparse.Namespace, settings: Settings) -> None:
    """The HTTP edge through nginx: max 202/s (wrk) and latency at a fixed offered rate."""
    from infra.edge import Edge
    from infra.services import all_services
    from producers.http.bench import run_http_bench

    started = [s for s in all_services(settings) if s.start()]
    edge = Edge(settings)
    edge_started = any(edge.up().values())
    try:
        figures = run_http_bench(settings, rate=2000, edge=edge)
    finally:
        if edge_started:
            edge.down()
        for service in reversed(started):
            service.stop()
    _show("HTTP edge through nginx (2 app servers)", _flat(figures))
    out = Path(args.http_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"written to {out}")


def _flat(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def core(args: argparse.Namespace, settings: Settings, bootstrap: str) -> None:
    """One inventory worker: in-process cost, backlogs, latency at fixed rates."""
    results: dict[str, Any] = {"in_process": in_process(args.intents)}
    _show("in-process SkuWriter.handle (no broker)", results["in_process"])
    for label, skus in (("backlog_one_hot_sku", 1), ("backlog_1000_skus", 1000)):
        results[label] = backlog(settings, bootstrap, args.intents, skus)
        _show(f"backlog of {args.intents} intents, {skus} SKU(s), one worker", results[label])
    for rate in (args.sustainable_rate, args.rate):
        key = f"latency_at_{rate}_per_s"
        results[key] = paced(settings, bootstrap, rate, args.seconds)
        _show(f"latency at {rate} intents/s offered", results[key])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written to {out}")


def _show(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}")
    for key, value in figures.items():
        print(f"  {key:<28} {value}")


def in_process(n: int) -> dict[str, Any]:
    """Decode + decide + encode through SkuWriter with no broker: the shell's own cost."""
    registry = SchemaRegistry.load_default()
    writer = SkuWriter(registry)
    writer.stale = False
    now = int(time.time() * 1000)
    opened = registry.encode(
        "SaleOpened",
        {
            "event_id": "e",
            "correlation_id": None,
            "producer": "bench",
            "occurred_at": now,
            "sale_id": "s",
            "sku": "hot",
            "allocation": n // 10,
            "per_user_limit": 2,
            "per_order_max": 2,
            "starts_at": now - 1000,
            "ends_at": now + 3_600_000,
        },
    )
    writer.handle(opened, now)
    values = [
        registry.encode(
            "PurchaseIntent",
            {
                "event_id": f"e{i}",
                "correlation_id": f"i{i}",
                "producer": "bench",
                "occurred_at": now,
                "intent_id": f"i{i}",
                "idempotency_key": f"k{i}",
                "user_id": f"u{i % 5000}",
                "sale_id": "s",
                "sku": "hot",
                "quantity": 1,
            },
        )
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for v in values:
        writer.handle(v, now)
    elapsed = time.perf_counter() - t0
    return {"decisions": n, "seconds": round(elapsed, 3), "decisions_per_s": round(n / elapsed)}


def _bench_settings(settings: Settings, tag: str) -> Settings:
    ns = f"bench-{tag}-{int(time.time())}"
    return dataclasses.replace(settings, namespace=ns)


def _start_worker(s: Settings) -> Service:
    worker = Service("processor", s)
    worker.start(env={"FLASHSALE_LOG_LEVEL": "WARNING"})
    return worker


def _rss_peak_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except FileNotFoundError:
        return None
    return None


def backlog(settings: Settings, bootstrap: str, n: int, skus: int) -> dict[str, Any]:
    """Pre-load n intents, then time one fresh worker deciding all of them."""
    s = _bench_settings(settings, f"b{skus}")
    names = TopicNames.of(s)
    provision.ensure_topics(bootstrap, catalogue(s))
    producer = CommandProducer(bootstrap, "bench", topic=names.sku_commands)
    now = int(time.time() * 1000)
    sku_names = [f"sku-{i:04d}" for i in range(skus)]
    producer.open_sale(
        "bench",
        [SkuAllocation(k, max(1, n // (10 * skus)), 2, 2) for k in sku_names],
        now - 1000,
        now + 3_600_000,
    )
    futures = [
        producer.submit_intent("bench", sku_names[i % skus], f"u{i % 20000}", 1, f"k{i}")[1]
        for i in range(n)
    ]
    producer.wait(futures)
    watcher = _DecisionWatcher(bootstrap, names.decisions)
    worker = _start_worker(s)
    t_start = time.monotonic()
    first = last = None
    count = 0
    peak = None
    while count < n and time.monotonic() - t_start < 600:
        got, stamps = watcher.poll()
        if got:
            count += got
            first = first or min(stamps)
            last = max(stamps)
        peak = _rss_peak_mb(worker.pid()) or peak
    worker.stop()
    watcher.close()
    span = (last - first) / 1000 if first and last and last > first else float("nan")
    return {
        "decisions": count,
        "seconds_first_to_last": round(span, 2),
        "decisions_per_s": round(count / span) if span == span and span > 0 else None,
        "worker_startup_to_first_s": round((first / 1000 - _wall(t_start)), 2) if first else None,
        "processor_peak_rss_mb": peak,
    }


def _wall(monotonic_t: float) -> float:
    return time.time() - (time.monotonic() - monotonic_t)


def paced(settings: Settings, bootstrap: str, rate: int, seconds: int) -> dict[str, Any]:
    """Offer intents at a fixed rate to a running worker; decision latency from the log."""
    s = _bench_settings(settings, "paced")
    names = TopicNames.of(s)
    provision.ensure_topics(bootstrap, catalogue(s))
    producer = CommandProducer(bootstrap, "bench", topic=names.sku_commands)
    now = int(time.time() * 1000)
    producer.open_sale(
        "bench",
        [SkuAllocation(f"sku-{i}", 10_000, 2, 2) for i in range(100)],
        now - 1000,
        now + 3_600_000,
    )
    worker = _start_worker(s)
    watcher = _DecisionWatcher(bootstrap, names.decisions, latency=True)
    time.sleep(8)  # let the worker join and recover before offering load
    total = rate * seconds
    t0 = time.monotonic()
    futures = []
    for i in range(total):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(producer.submit_intent("bench", f"sku-{i % 100}", f"u{i}", 1, f"k{i}")[1])
        if i % 500 == 0:
            watcher.poll(0)
    producer.wait(futures)
    offered = total / (time.monotonic() - t0)
    deadline = time.monotonic() + 60
    while len(watcher.latencies) < total and time.monotonic() < deadline:
        watcher.poll()
    peak = _rss_peak_mb(worker.pid())
    worker.stop()
    watcher.close()
    lat = sorted(watcher.latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
    return {
        "offered_per_s": round(offered),
        "decided": len(lat),
        "latency_ms_p50": round(q[49], 1),
        "latency_ms_p99": round(q[98], 1),
        "latency_ms_max": round(lat[-1], 1) if lat else None,
        "processor_peak_rss_mb": peak,
        "commit_interval_ms": env_int(os.environ, "FLASHSALE_COMMIT_INTERVAL_MS", 100, 1, 60_000),
    }


class _DecisionWatcher:
    """Reads decisions; records each record's broker timestamp or receive latency."""

    def __init__(self, bootstrap: str, topic: str, latency: bool = False) -> None:
        self._c = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-{time.time_ns()}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        parts = self._c.list_topics(topic, timeout=10).topics[topic].partitions
        self._c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self._latency = latency
        self._registry = SchemaRegistry.load_default()
        self.latencies: list[float] = []

    def poll(self, timeout: float = 0.2) -> tuple[int, list[int]]:
        msgs = [m for m in self._c.consume(5000, timeout) if not m.error()]
        stamps = [m.timestamp()[1] for m in msgs]
        if self._latency:
            now = time.time() * 1000
            for m in msgs:
                _, rec = self._registry.decode(m.value() or b"")
                self.latencies.append(now - rec["decided_at"])
        return len(msgs), stamps

    def close(self) -> None:
        self._c.close()
