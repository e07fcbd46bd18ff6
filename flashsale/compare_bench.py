"""`flashsale bench --only compare`: flashsale against the designs people would build instead,
one after another on this machine in one run (figures measured, never asserted).

* ``flashsale_core``: a backlog of intents in the command topic, decided by one writer
  (exactly-once), with the broker's default flushing and with an fsync per write;
* ``postgres``: one row per SKU decremented under a row lock, a transaction per intent
  (``flashsale.baselines.postgres_lock``), swept over client counts, ``synchronous_commit``
  on, then the best count with it off;
* ``redis``: the Lua check-and-decrement-and-enqueue (``flashsale.baselines.redis_lua``) on a
  redis-server the bench starts and stops, ``appendfsync everysec`` and ``always``.

Workloads: one hot SKU; *accept-heavy* (every intent decrements the stock and writes an
order) for throughput, *oversubscribed* (ten intents per unit, two units per user at most)
for correctness: what each system sold against its allocation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from flashsale.baselines import postgres_lock, redis_lua
from flashsale.settings import Settings

CLIENTS = (8, 16, 32, 64)

DURABILITY = {
    "flashsale_core": "acks=all to one broker, default flushing: an answer is in the broker's "
    "page cache (survives a broker crash; an OS crash can lose what Linux had not written back, "
    "up to ~30 s; a cluster with min.insync.replicas=2 closes that)",
    "flashsale_core_fsync_per_write": "acks=all, flush.messages=1: fsynced before the answer",
    "postgres": "synchronous_commit=on: WAL fsynced before the answer",
    "postgres_sync_off": "synchronous_commit=off: a crash can lose ~0.6 s of answered "
    "transactions (the database stays consistent)",
    "redis": "appendfsync everysec: an OS crash can lose ~1 s of answered purchases (a "
    "redis-server crash alone loses nothing written to the AOF); orders reach a database only "
    "later, from the stream",
    "redis_fsync_always": "appendfsync always: fsynced before the answer; orders reach a "
    "database only later, from the stream",
}


SHORT = {  # the durability column of the terminal table
    "flashsale_core": "page cache (OS crash)",
    "flashsale_core_fsync_per_write": "fsync per write",
    "postgres": "fsync per commit",
    "postgres_sync_off": "~0.6 s at risk",
    "redis": "~1 s at risk (OS crash)",
    "redis_fsync_always": "fsync per write",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    intents: int = 200_000  # per run of flashsale and Redis
    seconds: int = 20  # per PostgreSQL run (fewer decisions than intents in that time)
    oversubscribed: int = 20_000  # intents of the correctness runs
    users: int = 20_000


SMOKE = Sizes(intents=2_000, seconds=2, oversubscribed=1_000, users=500)


def run(settings: Settings, broker_pid: int | None, postmaster: int, sizes: Sizes) -> dict:
    """Every system, every workload; the JSON of ``--out`` (see the module docstring)."""
    from flashsale import writer_bench as wb

    systems: dict[str, dict[str, Any]] = {}
    n = sizes.intents
    for name, fsync in (("flashsale_core", False), ("flashsale_core_fsync_per_write", True)):
        heavy = wb.backlog(settings, broker_pid, n, 1, "accept-heavy", fsync_per_write=fsync)
        over = wb.backlog(settings, broker_pid, sizes.oversubscribed, 1, "oversubscribed",
                          fsync_per_write=fsync)  # fmt: skip
        systems[name] = {
            "decisions_per_s": heavy["decisions_per_s"],
            "cpu_ms_per_1000": _sum(
                heavy["worker_cpu_us_per_decision"], heavy["broker_cpu_us_per_decision"]
            ),
            "peak_rss_mb": heavy["worker_peak_rss_mb"],
            "latency_ms_p99": None,  # not measured yet: the open-loop run per system is to come
            "oversold": over["oversold"],
            "oversubscribed": _sold(over),
            "accept_heavy": heavy,
        }

    pg = functools.partial(postgres_lock.run, settings.database_url, settings.pg_port, postmaster)
    sweep = [pg(clients=c, synchronous_commit=True, seconds=sizes.seconds,
                               users=sizes.users) for c in CLIENTS]  # fmt: skip
    best = max(sweep, key=lambda r: r["decisions_per_s"])
    off = pg(clients=best["clients"], synchronous_commit=False,
                            seconds=sizes.seconds, users=sizes.users)  # fmt: skip
    for name, heavy, sync in (("postgres", best, True), ("postgres_sync_off", off, False)):
        over = pg(clients=best["clients"], synchronous_commit=sync,
                                 seconds=None, intents=sizes.oversubscribed,
                                 users=sizes.oversubscribed // 4,
                                 allocation=sizes.oversubscribed // 10, per_user=2)  # fmt: skip
        systems[name] = _baseline(heavy, over, latency_ms_avg=heavy["latency_ms_avg"],
                                  latency_ms_p99=None, clients=heavy["clients"])  # fmt: skip
    systems["postgres"]["sweep"] = {
        str(r["clients"]): {"decisions_per_s": r["decisions_per_s"],
                            "cpu_ms_per_1000": r["cpu_ms_per_1000"]}
        for r in sweep
    }  # fmt: skip

    home = settings.state_dir / "bench" / "redis"
    port = _free_port()
    for name, appendfsync in (("redis", "everysec"), ("redis_fsync_always", "always")):
        heavy = redis_lua.run(home, port, appendfsync, intents=n, users=sizes.users)
        over = redis_lua.run(home, port, appendfsync, intents=sizes.oversubscribed,
                             users=sizes.oversubscribed // 4,
                             allocation=sizes.oversubscribed // 10, per_user=2)  # fmt: skip
        systems[name] = _baseline(heavy, over, latency_ms_p50=heavy["latency_ms_p50"],
                                  latency_ms_p99=heavy["latency_ms_p99"])  # fmt: skip
    for name, system in systems.items():
        system["durability"] = DURABILITY[name]

    core = systems["flashsale_core"]["decisions_per_s"] or 0
    machine = {"cores": os.cpu_count(), "fsync_us": fsync_us(settings.state_dir)}
    core_fsync = systems["flashsale_core_fsync_per_write"]["decisions_per_s"] or 0
    return {
        "machine": machine,
        "workload": {
            "sku": "one hot SKU",
            "accept_heavy_intents": n,
            "postgres_seconds_per_run": sizes.seconds,
            "users": sizes.users,
            "oversubscribed_intents": sizes.oversubscribed,
            "oversubscribed_allocation": sizes.oversubscribed // 10,
        },
        "systems": systems,
        "ratios": {
            "core_vs_postgres": _ratio(core, systems["postgres"]["decisions_per_s"]),
            "core_vs_redis": _ratio(core, systems["redis"]["decisions_per_s"]),
            "core_fsync_per_write_vs_redis_fsync_always": _ratio(
                core_fsync, systems["redis_fsync_always"]["decisions_per_s"]
            ),
            "core_vs_redis_fsync_always": _ratio(
                core, systems["redis_fsync_always"]["decisions_per_s"]
            ),
        },
    }


def fsync_us(directory: Path) -> float | None:
    """How long an fdatasync takes where the servers keep their data (pg_test_fsync): what
    every fsync-per-write variant pays per flush. A VM disk with a write cache answers in
    tens of µs, a disk that really flushes in milliseconds."""
    import re
    import subprocess

    from infra.postgres import pg_binary

    probe = directory / "fsync-probe"
    try:
        out = subprocess.run([pg_binary("pg_test_fsync"), "-s", "1", "-f", str(probe)],
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r"fdatasync\s+[\d.]+ ops/sec\s+(\d+) usecs/op", out)
    return float(m.group(1)) if m else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else round(sum(v for v in values if v), 1)


def _ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 2) if b else None


def _baseline(heavy: dict[str, Any], over: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A baseline's figures: throughput and CPU of its accept-heavy run, correctness of its
    oversubscribed run."""
    return {
        "decisions_per_s": heavy["decisions_per_s"],
        "cpu_ms_per_1000": heavy["cpu_ms_per_1000"],
        "client_cpu_ms_per_1000": heavy["client_cpu_ms_per_1000"],
        **extra,
        "oversold": over["oversold"],
        "oversubscribed": _sold(over),
    }


def _sold(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("units_sold", "allocation", "oversold", "users_over_limit", "stock_agrees_with_orders")
    return {k: run[k] for k in keys if k in run}


def table(figures: dict[str, Any]) -> Any:
    """The terminal table (rich)."""
    from rich.table import Table

    t = Table(title="flashsale against the classic designs (one hot SKU, same machine, same run)")
    for col in ("system", "decisions/s", "CPU ms / 1,000", "p99 ms", "oversold", "durability"):
        t.add_column(col, overflow="fold")
    for name, s in figures["systems"].items():
        t.add_row(name, f"{s['decisions_per_s']:,}" if s["decisions_per_s"] else "-",
                  str(s["cpu_ms_per_1000"]), str(s.get("latency_ms_p99") or "-"),
                  str(s["oversold"]), SHORT[name])  # fmt: skip
    return t


def write(figures: dict[str, Any], out: Path) -> None:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
