"""`flashsale soak` (`make soak`): a long sale at a steady rate with every process watched.

It starts what is not running (the servers, every service, the edge) in a namespace of its
own (``soak``), opens a sale with stock for the whole run, and sends intents through nginx at
``--rate`` for ``--minutes`` (open loop, ``flashsale load``'s generator). Every ``--every``
seconds it samples each process's resident memory and open files from ``/proc``: the app
servers, nginx, the writer, the projector, the analytics, the sale clock, the payment service,
Kafka and PostgreSQL. At the end it prints each process's growth (the last minute's median
against the first minute's, after a minute's warm-up), writes ``samples.json`` and a memory
chart (``memory.png``) under ``.state/soak/<time>/``, and stops what it started.

The default rate, 1,000/s, is about half of what the whole system answered here when offered
far more: at 3,200/s offered (half the edge bench's ~6,400 ``202``/s, measured with wrk and
without the analytics, clock and payment services) it answered ~1,700/s with every service
and this Python load generator (~250 µs of CPU per request) on the same two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from flashsale.settings import Settings
from infra import processes
from infra.edge import Edge
from infra.stack import Stack

DEFAULT_RATE = 1000.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `soak` command."""
    p = sub.add_parser("soak", help="a long sale at a steady rate; memory and files sampled")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help="intents per second")
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--out", help="directory for samples.json and memory.png")
    p.set_defaults(run=run)


def sample(run_dirs: list[Path]) -> dict[str, tuple[float, int]]:
    """Each live process with a pid file under ``run_dirs``, named ``<its dir>/<pid file>``:
    (RSS in MB, open files)."""
    out: dict[str, tuple[float, int]] = {}
    for run_dir in run_dirs:
        for pidfile in sorted(run_dir.rglob("*.pid")):
            try:
                pid = int(pidfile.read_text().split()[0])
                status = Path(f"/proc/{pid}/status").read_text()
                files = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, ValueError, IndexError):
                continue  # gone, or not ours to read
            rss = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS")), 0)
            out[f"{pidfile.parent.name}/{pidfile.stem}"] = (rss / 1024, files)
    return out


def growth(samples: list[dict[str, Any]], warmup_s: float = 60.0) -> dict[str, dict[str, float]]:
    """Per process: the median RSS and files of the first minute after the warm-up and of the
    last minute, and the change."""
    end = samples[-1]["t"]
    first = [s for s in samples if warmup_s <= s["t"] < warmup_s + 60] or samples[:1]
    last = [s for s in samples if s["t"] > end - 60] or samples[-1:]
    out: dict[str, dict[str, float]] = {}
    for name in sorted({n for s in samples for n in s["procs"]}):
        a = [s["procs"][name] for s in first if name in s["procs"]]
        b = [s["procs"][name] for s in last if name in s["procs"]]
        if not a or not b:
            continue
        rss_a, rss_b = statistics.median(x[0] for x in a), statistics.median(x[0] for x in b)
        fd_a, fd_b = statistics.median(x[1] for x in a), statistics.median(x[1] for x in b)
        out[name] = {"rss_mb_first": round(rss_a, 1), "rss_mb_last": round(rss_b, 1),
                     "rss_growth_mb": round(rss_b - rss_a, 1),
                     "rss_growth_pct": round(100 * (rss_b - rss_a) / rss_a, 1) if rss_a else 0.0,
                     "files_first": fd_a, "files_last": fd_b}  # fmt: skip
    return out


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start what is missing, soak, report, stop what was started."""
    from infra.services import all_services

    if args.minutes <= 0 or args.rate <= 0 or args.every <= 0:
        print("flashsale soak: --minutes, --rate and --every must be > 0")
        return 2
    settings = dataclasses.replace(settings, namespace="soak")
    out = Path(args.out or settings.state_dir / "soak" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings)
    with ExitStack() as cleanup:  # stops what it started, whatever fails on the way
        if any(stack.up().values()):
            cleanup.callback(stack.down)
        for service in all_services(settings):
            if service.start():
                cleanup.callback(service.stop)
        edge = _own_edge(settings, stack)
        cleanup.callback(edge.down)
        edge.up()
        samples, summary = _soak(args, settings, edge, stack)
    report = {**summary, "growth": growth(samples)}
    (out / "samples.json").write_text(json.dumps({"summary": report, "samples": samples}))
    _chart(samples, out / "memory.png")
    _print(report, out)
    return 0


def _own_edge(settings: Settings, stack: Stack) -> Edge:
    """nginx and two app servers of the soak's own, on free ports with their state under
    ``state_dir/soak/edge`` (``make up``'s edge may be serving the default namespace)."""
    from producers.http.auth import keys_dir, load_secret

    load_secret(settings.state_dir)  # the keyring exists before its servers look for it
    ep = stack.endpoints()
    env = {"FLASHSALE_INFRA": "external", "KAFKA_BOOTSTRAP_SERVERS": ep.bootstrap,
           "DATABASE_URL": ep.dsn,  # the stack's keyring: its tokens are the soak's
           "FLASHSALE_JWT_KEYS_DIR": str(keys_dir(settings.state_dir))}  # fmt: skip
    own = dataclasses.replace(settings, state_dir=settings.state_dir / "soak" / "edge",
                              http_port=processes.free_port())  # fmt: skip
    return Edge(own, server_ports=[processes.free_port() for _ in range(2)], env=env)


def _soak(args: argparse.Namespace, settings: Settings, edge: Edge,
          stack: Stack) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    from flashsale.demo import _open_over_http
    from producers.commands import SkuAllocation
    from producers.http.auth import load_secret, token
    from producers.http.config import EdgeSettings
    from producers.load import Plan, Tally, http_run, summary

    url = edge.url
    seconds = args.minutes * 60
    sale_id = f"soak-{int(time.time())}"
    skus = [f"{sale_id}-{n}" for n in range(8)]
    units = int(args.rate * seconds)  # never sells out: the accept path all along
    _open_over_http(url, settings, sale_id, [SkuAllocation(s, units, 10**6, 1) for s in skus])
    users = 20_000
    plan = Plan.make(11, args.rate, seconds, 0, users, skus, "uniform")
    secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
    tokens = [token(f"load-{u}", "shopper", int(seconds) + 3600, secret) for u in range(users)]
    tally = Tally()
    run_dirs = [settings.state_dir / "run" / settings.namespace, edge.settings.state_dir,
                *stack.kafka.homes, stack.postgres.home]  # fmt: skip
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            procs = sample(run_dirs)
            samples.append({"t": round(time.monotonic() - t0, 1), "sent": tally.sent,
                            "answered": tally.answered, "procs": procs})  # fmt: skip
            print(f"  {samples[-1]['t']:6.0f} s  sent {tally.sent:>9,}  answered "
                  f"{tally.answered:>9,}  processes {len(procs)}", flush=True)  # fmt: skip
            stop.wait(args.every)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    path = f"/v1/sales/{sale_id}/intents"
    asyncio.run(http_run(url, path, tokens, plan, tally))
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    load = summary(plan, tally, wall, time.process_time() - cpu0, "202")
    return samples, {"sale_id": sale_id, "rate": args.rate, "minutes": args.minutes,
                     "load": load}  # fmt: skip


def _chart(samples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for name in sorted({n for s in samples for n in s["procs"]}):
        pts = [(s["t"], s["procs"][name][0]) for s in samples if name in s["procs"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("flashsale soak: resident memory per process")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    load = report["load"]
    table = Table(title=f"soak: {report['minutes']:g} min at {report['rate']:g}/s "
                        f"(sale {report['sale_id']})")  # fmt: skip
    for col in ("process", "RSS first min (MB)", "RSS last min (MB)", "growth", "files"):
        table.add_column(col)
    for name, g in report["growth"].items():
        table.add_row(name, f"{g['rss_mb_first']:.1f}", f"{g['rss_mb_last']:.1f}",
                      f"{g['rss_growth_mb']:+.1f} MB ({g['rss_growth_pct']:+.1f}%)",
                      f"{g['files_first']:g} -> {g['files_last']:g}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print_json(data=load)
    console.print(f"samples: {out / 'samples.json'}  chart: {out / 'memory.png'}")
