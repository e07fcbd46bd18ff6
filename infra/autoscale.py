"""`flashsale autoscale`: app servers behind nginx on CPU and request rate, writer workers on
consumer lag (the policy: ``infra.autoscale_policy``).

Every ``interval`` seconds it scrapes the namespace's ``/metrics`` (``flashsale.scrape``: each
app server's CPU and requests, the writer group's lag), asks the policy, and acts:

* **add an app server**: start it on the next port, wait for ``/healthz``, then reload nginx
  with it upstream (``LocalNginx.reload``: SIGHUP, no request dropped);
* **remove one**: reload nginx without it first, give the requests it holds ``DRAIN_S``, then
  SIGTERM it (uvicorn finishes what it has; its event streams end and the clients resume with
  ``Last-Event-ID`` on another server, which replays exactly what they missed). Upstreams
  hash on the user: about 1/n of users move, and their rate buckets start full;
* **add / remove a writer worker**: ``ExtraWorker`` (its own member id and RocksDB); the group
  rebalances and the log decides who writes what. The supervised first worker is never
  removed, and at most ``FLASHSALE_PARTITIONS`` workers can have work.

Each decision is logged (``autoscale.decision``) and appended to
``run/<ns>/autoscale.jsonl``; the latest sample is in ``run/<ns>/autoscale-now.json``; the
live page shows both. On SIGTERM or Ctrl-C it puts the edge and the workers back as it found
them (what it started, it stops), so it leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from flashsale.scrape import Scrape, rate, scrape
from flashsale.service_metrics import cards
from flashsale.settings import Settings
from infra import processes
from infra.autoscale_policy import Autoscaler, Bounds, Decision, Policy, Sample
from infra.edge import AppServer, Edge
from infra.errors import InfraError
from infra.services import ExtraWorker, Service, extra_workers, run_dir

log = structlog.get_logger(__name__)

DRAIN_S = 1.0
SCRAPE_TIMEOUT_S = 2.0  # a saturated app server answers /metrics late, not never
DECISIONS_FILE = "autoscale.jsonl"
NOW_FILE = "autoscale-now.json"


class HostCpu:
    """Idle cores of the host between two readings of /proc/stat (idle + iowait)."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._last = self._read()

    def _read(self) -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        return time.monotonic(), (int(fields[3]) + int(fields[4])) / self._tick

    def idle_cores(self) -> float:
        (t0, idle0), (t1, idle1) = self._last, self._read()
        self._last = (t1, idle1)
        return max(0.0, (idle1 - idle0) / (t1 - t0)) if t1 > t0 else 0.0


def complete(now: list[Scrape], before: dict[str, Scrape]) -> bool:
    """Whether every process answered both scrapes: a missing figure is not a zero (a
    saturated host answers ``/metrics`` slowly, and must not look idle)."""
    return all(s.error is None and s.key in before and before[s.key].error is None
               for s in now)  # fmt: skip


def measure(now: list[Scrape], before: dict[str, Scrape], at: float, servers: int,
            workers: int, host_idle: float = 0.0) -> Sample:  # fmt: skip
    """A sample from two scrapes of the fleet (rates between them)."""
    apps = [s for s in now if s.kind == "app" and s.error is None]
    cpu = [rate(s, before.get(s.key), "process_cpu_seconds_total") for s in apps]
    rps = [rate(s, before.get(s.key), "flashsale_http_requests_total") for s in apps]
    known_cpu = [c for c in cpu if c is not None]
    lags = [s.value("flashsale_consumer_lag") for s in now
            if s.kind == "processor" and s.error is None]  # fmt: skip
    return Sample(
        at=at,
        servers=servers,
        workers=workers,
        server_cpu=sum(known_cpu) / len(known_cpu) if known_cpu else 0.0,
        requests_per_s=sum(r for r in rps if r is not None),
        lag=int(max(lags)) if lags else 0,  # every worker reports its group's lag
        host_idle=host_idle,
    )


class Fleet:
    """The app servers behind nginx and the writer workers: counted, added, removed, and put
    back as they were found."""

    def __init__(self, settings: Settings, env: dict[str, str] | None = None,
                 edge: Edge | None = None) -> None:  # fmt: skip
        """``settings``: the namespace (its workers); ``edge``: the one `make up` runs, unless
        another is given; ``env``: for what it starts, as the others were given."""
        self.settings = settings
        self.env = dict(env or {})
        self.edge = edge or Edge(settings)
        if self.edge.nginx.pid() is None:
            raise InfraError("nginx is not running: start the edge first (make up)")
        self.servers = self._running_servers()
        if not self.servers:
            raise InfraError("no app server is running: start the edge first (make up)")
        self.first = Service("processor", settings)
        self.found_servers = [s.port for s in self.servers]
        self.found_workers = [w.worker_id for w in extra_workers(settings) if w.pid()]
        self.nginx = self.edge.nginx.reload(self.found_servers)  # upstream = what runs

    def _running_servers(self) -> list[AppServer]:
        """Every app server of the edge's run directory that runs: the configured ones and
        any added since (by an earlier autoscaler, or by hand)."""
        run = AppServer(self.edge.settings, 0).run_dir
        ports = sorted(int(p.stem.removeprefix("app-")) for p in run.glob("app-*.pid"))
        known = {s.port: s for s in self.edge.servers}
        found = [known.get(p) or AppServer(self.edge.settings, p, self.env) for p in ports]
        return [s for s in found if s.pid() is not None]

    def workers(self) -> list[ExtraWorker]:
        return [w for w in extra_workers(self.settings) if w.pid() is not None]

    def worker_count(self) -> int:
        return (self.first.pid() is not None) + len(self.workers())

    def targets(self) -> list[Scrape]:
        """Every app server and writer worker serving ``/metrics`` now."""
        apps = [Scrape(f"app:{s.port}", "app", s.pid(), f"{s.url}/metrics") for s in self.servers]
        workers = [Scrape(c["service"], c["service"], int(c["pid"]),
                          f"http://127.0.0.1:{c['port']}/metrics")
                   for c in cards(self.settings) if c["service"] == "processor"]  # fmt: skip
        return apps + workers

    def apply(self, d: Decision) -> None:
        if d.kind == "servers":
            self.add_server() if d.step > 0 else self.remove_server()
        else:
            self.add_worker() if d.step > 0 else self.remove_worker()

    def add_server(self) -> None:
        port = max(s.port for s in self.servers) + 1
        while not processes.port_is_free(port):
            port += 1
        server = AppServer(self.edge.settings, port, self.env)
        try:
            server.start()  # until /healthz answers
        except BaseException:
            server.stop()  # not left running untracked
            raise
        self.servers.append(server)
        self.nginx = self.nginx.reload([s.port for s in self.servers])

    def remove_server(self, server: AppServer | None = None) -> None:
        server = server or self.servers[-1]
        self.servers.remove(server)
        self.nginx = self.nginx.reload([s.port for s in self.servers])
        time.sleep(DRAIN_S)  # the old nginx worker finishes what it sent there
        server.stop()

    def add_worker(self) -> None:
        ids = [w.worker_id for w in extra_workers(self.settings)]
        ExtraWorker("processor", self.settings, max(ids, default=0) + 1).start(self.env)

    def remove_worker(self) -> None:
        running = self.workers()
        if running:
            running[-1].stop()

    def restore(self) -> None:
        """Back to the servers and workers found at the start."""
        for port in self.found_servers:
            if port not in {s.port for s in self.servers}:
                server = AppServer(self.edge.settings, port, self.env)
                server.start()
                self.servers.append(server)
        self.nginx = self.nginx.reload(self.found_servers)
        for server in [s for s in self.servers if s.port not in self.found_servers]:
            time.sleep(DRAIN_S)
            server.stop()
            self.servers.remove(server)
        running = {w.worker_id for w in self.workers()}
        for worker in self.workers():
            if worker.worker_id not in self.found_workers:
                worker.stop()
        for worker_id in self.found_workers:  # one it stopped (above the maximum)
            if worker_id not in running:
                ExtraWorker("processor", self.settings, worker_id).start(self.env)


def run(
    settings: Settings,
    policy: Policy,
    interval_s: float,
    stop: threading.Event,
    on_sample: Callable[[Sample, list[Decision]], None] | None = None,
    env: dict[str, str] | None = None,
    edge: Edge | None = None,
) -> list[dict[str, Any]]:
    """Sample, decide and act until ``stop``; then restore. Returns the decisions made."""
    fleet = Fleet(settings, env, edge)
    scaler = Autoscaler(policy)
    runs = run_dir(settings)
    record, now_file = runs / DECISIONS_FILE, runs / NOW_FILE
    made: list[dict[str, Any]] = []
    before: dict[str, Scrape] = {}
    host = HostCpu()
    log.info("autoscale.started", servers=len(fleet.servers), workers=fleet.worker_count(),
             policy=asdict(policy))  # fmt: skip
    try:
        while not stop.wait(interval_s):
            fleet.servers = [s for s in fleet.servers if s.pid() is not None]  # one exited
            scraped = [scrape(t, timeout=SCRAPE_TIMEOUT_S) for t in fleet.targets()]
            sample = measure(scraped, before, time.monotonic(), len(fleet.servers),
                             fleet.worker_count(), host.idle_cores())  # fmt: skip
            known = complete(scraped, before)  # the first sample has no rates yet
            before = {s.key: s for s in scraped}
            decisions = scaler.decide(sample, known)
            _write_now(now_file, sample)
            for d in decisions:
                row = _act(fleet, scaler, d, sample)
                made.append(row)
                with record.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if on_sample is not None:
                on_sample(sample, decisions)
    finally:
        fleet.restore()
        now_file.unlink(missing_ok=True)
        log.info("autoscale.stopped", decisions=len(made))
    return made


def _act(fleet: Fleet, scaler: Autoscaler, d: Decision, sample: Sample) -> dict[str, Any]:
    began = time.monotonic()
    try:
        fleet.apply(d)
        outcome = "done"
    except (InfraError, OSError) as exc:  # a server that would not start: said, tried again
        outcome = f"failed: {exc}"
    scaler.changed(d.kind, time.monotonic())
    row = {"at": datetime.now(UTC).isoformat(timespec="milliseconds"), **asdict(d),
           "outcome": outcome, "took_s": round(time.monotonic() - began, 2),
           "sample": {k: round(v, 3) if isinstance(v, float) else v
                      for k, v in asdict(sample).items() if k != "at"}}  # fmt: skip
    log.info("autoscale.decision", **{k: v for k, v in row.items() if k != "at"})
    return row


def _write_now(path: Path, sample: Sample) -> None:
    data = {k: v for k, v in asdict(sample).items() if k != "at"}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**data, "at": time.time()}))
    tmp.replace(path)


def recent(settings: Settings, n: int = 20) -> dict[str, Any]:
    """The latest sample (while the autoscaler runs) and its last ``n`` decisions."""
    runs = run_dir(settings)
    try:
        lines = (runs / DECISIONS_FILE).read_text().splitlines()[-n:]
    except FileNotFoundError:
        lines = []
    try:
        now = json.loads((runs / NOW_FILE).read_text())
    except (FileNotFoundError, ValueError):
        now = None
    return {"now": now, "decisions": [json.loads(line) for line in lines]}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale autoscale`."""
    p = sub.add_parser("autoscale", help="add and remove app servers and writer workers on "
                       "load, until Ctrl-C (then puts them back as found)")  # fmt: skip
    d = Policy()
    p.add_argument("--servers", default=f"{d.servers.low}-{d.servers.high}", help="min-max")
    p.add_argument("--workers", default=f"{d.workers.low}-{d.workers.high}", help="min-max")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--sustain", type=int, default=d.sustain, help="samples a condition holds")
    p.add_argument("--cooldown", type=float, default=d.cooldown_s, help="seconds after a change")
    for name in ("cpu_high", "cpu_low", "rps_high", "rps_low", "lag_high", "lag_low", "headroom"):
        value = getattr(d, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.set_defaults(run=run_command)


def bounds(text: str) -> Bounds:
    low, _, high = text.partition("-")
    try:
        return Bounds(int(low), int(high or low))
    except ValueError as exc:
        raise InfraError(f"bounds {text!r}: {exc} (write min-max, e.g. 1-4)") from None


def policy_of(args: argparse.Namespace) -> Policy:
    try:
        return Policy(servers=bounds(args.servers), workers=bounds(args.workers),
                      cpu_high=args.cpu_high, cpu_low=args.cpu_low, rps_high=args.rps_high,
                      rps_low=args.rps_low, lag_high=args.lag_high, lag_low=args.lag_low,
                      sustain=args.sustain, cooldown_s=args.cooldown,
                      headroom=args.headroom)  # fmt: skip
    except ValueError as exc:
        raise InfraError(str(exc)) from None


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    from infra.signals import stop_on_signals

    policy = policy_of(args)
    if policy.workers.high > settings.partitions:
        raise InfraError(
            f"at most {settings.partitions} workers can have a partition "
            f"(FLASHSALE_PARTITIONS); --workers asks for {policy.workers.high}"
        )
    stop = stop_on_signals(log, "autoscale.stopping")

    def show(s: Sample, decisions: list[Decision]) -> None:
        said = "; ".join(f"{d.kind} {d.step:+d} -> {d.to} ({d.reason})" for d in decisions)
        print(f"servers {s.servers} (cpu {s.server_cpu:.2f}, {s.requests_per_s:.0f} req/s)  "
              f"workers {s.workers} (lag {s.lag})  host idle {s.host_idle:.2f} cores  {said}",
              flush=True)  # fmt: skip

    run(settings, policy, args.interval, stop, show)
    return 0
