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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from flashsale.baselines import postgres_lock, redis_lua
from flashsale.settings import Settings
from infra.processes import free_port

CLIENTS = (8, 16, 32, 64)
log = structlog.get_logger("flashsale.compare_bench")

DURABILITY = {
    "flashsale_core": "acks=all to one broker, default flushing: an answer is in the broker's "
    "page cache (survives a broker crash; an OS crash can lose what Linux had not written back, "
    "up to ~30 s; a cluster with min.insync.replicas=2 closes that)",
    "flashsale_core_fsync_per_write": "acks=all, flush.messages=1: fsynced before the answer",
    "flashsale_http": "as flashsale_core: the 202 comes once the intent is acknowledged by the "
    "broker (acks=all); its decision and its order in PostgreSQL follow",
    "postgres": "synchronous_commit=on: WAL fsynced before the answer",
    "postgres_sync_off": "synchronous_commit=off: a crash can lose ~0.6 s of answered "
    "transactions (the database stays consistent)",
    "redis": "appendfsync everysec: an OS crash can lose ~1 s of answered purchases (a "
    "redis-server crash alone loses nothing written to the AOF); orders reach a database only "
    "later, from the stream",
    "redis_fsync_always": "appendfsync always: fsynced before the answer; orders reach a "
    "database only later, from the stream",
}


# What each system's latency figure times (all open loop, from the scheduled send).
LATENCY = {
    "flashsale_core": "intent scheduled to be produced -> its decision visible to a "
    "read_committed consumer (the writer commits every FLASHSALE_COMMIT_INTERVAL_MS, 100 ms by "
    "default; the load generator lingers 20 ms)",
    "flashsale_http": "POST scheduled -> its decision visible to a read_committed consumer "
    "(the 202, queued, comes earlier: answer_202)",
    "postgres": "transaction scheduled -> committed answer (pgbench -R, schedule lag included)",
    "redis": "call scheduled -> script's answer (our open-loop client, 8 pipelined connections)",
}

SHORT = {  # the durability column of the terminal table
    "flashsale_core": "page cache (OS crash)",
    "flashsale_core_fsync_per_write": "fsync per write",
    "flashsale_http": "page cache (OS crash)",
    "postgres": "fsync per commit",
    "postgres_sync_off": "~0.6 s at risk",
    "redis": "~1 s at risk (OS crash)",
    "redis_fsync_always": "fsync per write",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    intents: int = 200_000  # per run of flashsale and Redis
    seconds: int = 20  # per PostgreSQL run and per max-load run over HTTP
    latency_seconds: int = 10  # per open-loop run at half a system's maximum
    oversubscribed: int = 20_000  # intents of the correctness runs
    users: int = 20_000
    http_users: int = 5_000


SMOKE = Sizes(intents=2_000, seconds=2, latency_seconds=2, oversubscribed=1_000, users=500,
              http_users=200)  # fmt: skip
MANY = 1_000  # SKUs of the many-SKU workload


def run(settings: Settings, broker_pid: int | None, postmaster: int, sizes: Sizes,
        over_http: Callable[[], dict[str, Any]] | None = None) -> dict:  # fmt: skip
    """Every system, every workload; the JSON of ``--out`` (see the module docstring).
    ``over_http`` measures ``flashsale_http`` (compare_http.run on a stack of its own)."""
    systems: dict[str, dict[str, Any]] = {}
    parts: list[tuple[tuple[str, ...], Callable[[], dict[str, dict]]]] = [
        (("flashsale_core", "flashsale_core_fsync_per_write"),
         lambda: _flashsale(settings, broker_pid, sizes)),
        (("flashsale_http",), lambda: {"flashsale_http": over_http()} if over_http else {}),
        (("postgres", "postgres_sync_off"), lambda: _postgres(settings, postmaster, sizes)),
        (("redis", "redis_fsync_always"), lambda: _redis(settings, sizes)),
    ]  # fmt: skip
    for names, measure in parts:
        try:
            systems.update(measure())
        except Exception as exc:  # one system failing keeps the others' figures
            log.exception("bench.compare.failed", systems=names)
            failed = {"error": f"{type(exc).__name__}: {exc}", "decisions_per_s": None,
                      "cpu_ms_per_1000": None, "oversold": None}  # fmt: skip
            systems.update({n: dict(failed) for n in names})
    for name, system in systems.items():
        system["durability"] = DURABILITY[name]
        system["latency_is"] = next(v for k, v in LATENCY.items() if name.startswith(k))

    def dps(name: str) -> float | None:
        return systems.get(name, {}).get("decisions_per_s")

    core, core_fsync = dps("flashsale_core") or 0, dps("flashsale_core_fsync_per_write") or 0
    many = {n: s.get("decisions_per_s_1000_skus") for n, s in systems.items()}
    return {
        "machine": {"cores": os.cpu_count(), "fsync_us": fsync_us(settings.state_dir)},
        "workload": {
            "sku": "one hot SKU (decisions_per_s); 1,000 SKUs (decisions_per_s_1000_skus)",
            "accept_heavy_intents": sizes.intents,
            "postgres_and_http_seconds_per_run": sizes.seconds,
            "latency_seconds": sizes.latency_seconds,
            "users": sizes.users,
            "oversubscribed_intents": sizes.oversubscribed,
            "oversubscribed_allocation": sizes.oversubscribed // 10,
        },
        "systems": systems,
        "ratios": {
            "core_vs_postgres": _ratio(core, dps("postgres")),
            "core_vs_redis": _ratio(core, dps("redis")),
            "core_fsync_per_write_vs_redis_fsync_always": _ratio(
                core_fsync, dps("redis_fsync_always")
            ),
            "core_vs_redis_fsync_always": _ratio(core, dps("redis_fsync_always")),
            "core_vs_postgres_1000_skus": _ratio(
                many.get("flashsale_core") or 0, many.get("postgres")
            ),
        },
    }


def _flashsale(settings: Settings, broker_pid: int | None, sizes: Sizes) -> dict[str, dict]:
    """One writer deciding a backlog (hot SKU, 1,000 SKUs, oversubscribed), then an open loop
    at half its hot-SKU maximum; with the broker's default flushing and with fsync per write."""
    from flashsale import writer_bench as wb

    n, out = sizes.intents, {}
    # Discarded: a freshly started broker spends its first minutes compiling (JIT) the code of
    # a new workload, which a long-running one does not (PostgreSQL and Redis have no JIT).
    wb.backlog(settings, broker_pid, max(1, n // 10), 1, "accept-heavy")
    for name, fsync in (("flashsale_core", False), ("flashsale_core_fsync_per_write", True)):
        backlog = functools.partial(wb.backlog, settings, broker_pid, fsync_per_write=fsync)
        heavy, many = backlog(n, 1, "accept-heavy"), backlog(n, MANY, "accept-heavy")
        over = backlog(sizes.oversubscribed, 1, "oversubscribed")
        half = max(100, (heavy["decisions_per_s"] or 200) // 2)
        latency = wb.latency(settings, broker_pid, half, sizes.latency_seconds, skus=1,
                             fsync_per_write=fsync)  # fmt: skip
        out[name] = {
            "decisions_per_s": heavy["decisions_per_s"],
            "decisions_per_s_1000_skus": many["decisions_per_s"],
            # The writer and the broker deciding, and the broker taking the intents in
            # (as PostgreSQL's and Redis's figures include taking each request in).
            "cpu_ms_per_1000": _sum(
                heavy["worker_cpu_us_per_decision"],
                heavy["broker_cpu_us_per_decision"],
                heavy["broker_intake_cpu_us_per_intent"],
            ),
            "peak_pss_mb": heavy["worker_and_broker_peak_pss_mb"],
            "latency_offered_per_s": latency["offered_per_s"],
            **{k: v for k, v in latency.items() if k.startswith("latency_ms")},
            "oversold": over["oversold"],
            "oversubscribed": _sold(over),
            "runs": {"accept_heavy": heavy, "accept_heavy_1000_skus": many, "latency": latency},
        }
    return out


def _postgres(settings: Settings, postmaster: int, sizes: Sizes) -> dict[str, dict]:
    """pgbench swept over client counts (hot SKU, then 1,000 SKUs), synchronous_commit on;
    the best counts again with it off; open loop at half the best; oversubscribed."""
    pg = functools.partial(postgres_lock.run, settings.database_url, settings.pg_port, postmaster,
                           seconds=sizes.seconds, users=sizes.users)  # fmt: skip
    sweeps = {skus: [pg(clients=c, synchronous_commit=True, skus=skus) for c in CLIENTS]
              for skus in (1, MANY)}  # fmt: skip
    best = {skus: max(sweep, key=lambda r: r["decisions_per_s"]) for skus, sweep in sweeps.items()}
    out = {}
    for name, sync in (("postgres", True), ("postgres_sync_off", False)):
        clients = best[1]["clients"]
        heavy = best[1] if sync else pg(clients=clients, synchronous_commit=False)
        many = best[MANY] if sync else pg(clients=best[MANY]["clients"], synchronous_commit=False,
                                          skus=MANY)  # fmt: skip
        half = max(50, heavy["decisions_per_s"] // 2)
        paced = pg(clients=clients, synchronous_commit=sync, seconds=sizes.latency_seconds,
                   rate=half)  # fmt: skip
        over = pg(clients=clients, synchronous_commit=sync, seconds=None,
                  intents=sizes.oversubscribed, users=sizes.oversubscribed // 4,
                  allocation=sizes.oversubscribed // 10, per_user=2)  # fmt: skip
        out[name] = {
            **_baseline(heavy, over),
            "clients": clients,
            "decisions_per_s_1000_skus": many["decisions_per_s"],
            "clients_1000_skus": many["clients"],
            "latency_offered_per_s": half,
            **{k: v for k, v in paced.items() if k.startswith("latency_ms_p")},
            "runs": {"latency": paced},
        }
    out["postgres"]["sweep"] = {
        f"{skus}_sku": {str(r["clients"]): {"decisions_per_s": r["decisions_per_s"],
                                            "cpu_ms_per_1000": r["cpu_ms_per_1000"]}
                        for r in sweep}
        for skus, sweep in sweeps.items()
    }  # fmt: skip
    return out


def _redis(settings: Settings, sizes: Sizes) -> dict[str, dict]:
    """redis-benchmark's clients at full speed (hot SKU, 1,000 SKUs), an open loop at half
    the hot-SKU figure, oversubscribed; ``appendfsync everysec`` and ``always``."""
    home, port, out = settings.state_dir / "bench" / "redis", free_port(), {}
    for name, appendfsync in (("redis", "everysec"), ("redis_fsync_always", "always")):
        r = functools.partial(redis_lua.run, home, port, appendfsync)
        heavy = r(intents=sizes.intents, users=sizes.users)
        many = r(intents=sizes.intents, users=sizes.users, skus=MANY)
        half = max(50, heavy["decisions_per_s"] // 2)
        paced = r(intents=half * sizes.latency_seconds, users=sizes.users, rate=half)
        over = r(intents=sizes.oversubscribed, users=sizes.oversubscribed // 4,
                 allocation=sizes.oversubscribed // 10, per_user=2)  # fmt: skip
        out[name] = {
            **_baseline(heavy, over),
            "decisions_per_s_1000_skus": many["decisions_per_s"],
            "latency_offered_per_s": half,
            **{k: v for k, v in paced.items() if k.startswith("latency_ms_p")},
            "runs": {"latency": paced},
        }
    return out


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


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else round(sum(v for v in values if v), 1)


def _ratio(a: float, b: float | None) -> float | None:
    return round(a / b, 2) if b else None


def _baseline(heavy: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A baseline's figures: throughput, CPU and memory of its accept-heavy run, correctness
    of its oversubscribed run."""
    return {
        "decisions_per_s": heavy["decisions_per_s"],
        "cpu_ms_per_1000": heavy["cpu_ms_per_1000"],
        "client_cpu_ms_per_1000": heavy["client_cpu_ms_per_1000"],
        "peak_pss_mb": heavy["peak_pss_mb"],
        "oversold": over["oversold"],
        "oversubscribed": _sold(over),
    }


def _sold(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("units_sold", "allocation", "oversold", "users_over_limit", "stock_agrees_with_orders")
    return {k: run[k] for k in keys if k in run}


def table(figures: dict[str, Any]) -> Any:
    """The terminal table (rich)."""
    from rich.table import Table

    t = Table(title="flashsale against the classic designs (same machine, same run)")
    for col in (
        "system",
        "decisions/s hot SKU",
        "1,000 SKUs",
        "CPU ms / 1,000",
        "p50 / p99 / p99.9 ms at half max",
        "peak MiB (PSS)",
        "oversold",
        "durability",
    ):
        t.add_column(col, overflow="fold")  # fmt: skip
    for name, s in figures["systems"].items():
        lat = " / ".join(_num(s.get(f"latency_ms_{p}")) for p in ("p50", "p99", "p999"))
        if "error" in s:
            t.add_row(name, "failed", "-", "-", s["error"][:60], "-", "-", SHORT[name])
            continue
        t.add_row(name, _num(s["decisions_per_s"]), _num(s.get("decisions_per_s_1000_skus")),
                  _num(s["cpu_ms_per_1000"]), f"{lat} @ {_num(s.get('latency_offered_per_s'))}/s",
                  _num(s.get("peak_pss_mb")), str(s["oversold"]), SHORT[name])  # fmt: skip
    return t


def _num(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def write(figures: dict[str, Any], out: Path) -> None:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
