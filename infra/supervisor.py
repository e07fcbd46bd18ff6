"""`flashsale supervise`: keep the services alive by restarting them (crash-only design).

The supervisor runs each service as its own child, writes the child's pid file where
``infra.services.Service`` looks for it, and restarts any child that exits, whatever the
exit code, with exponential backoff (``infra.restart_policy``). It never touches offsets.

Crash-record contract. A service that fails on one input record calls
``record_crash(settings_or_run_dir, name, partition, offset, reason)`` (its Settings, or the
run dir as a Path) just before it exits non-zero. That writes
``<run_dir>/<name>.crash.json`` atomically::

    {"partition": 3, "offset": 1041, "reason": "...", "at": 1718000000000}

(``at`` in epoch milliseconds; ``run_dir`` is ``<state_dir>/run/<namespace>``). The
supervisor reads and removes the file after each exit. When crash_limit exits in a row
record the same (partition, offset), it stops restarting that service, logs
``service.crash_loop`` at error level and writes ``<run_dir>/<name>.alert.json``, which
``flashsale infra status`` shows. The operator fixes the cause, then restarts the
supervisor (``flashsale infra down && flashsale infra up --services``): at start it
removes the alerts of the services it starts.

Also in the run dir: ``supervisor.pid``, ``supervisor.log`` (when started detached by
``infra.services.SupervisorProcess``), ``supervisor.json`` (state and restarts per service)
and ``supervisor.prom`` (Prometheus text format); both rewritten on every event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flashsale.service_metrics import ServiceMetrics
from flashsale.settings import Settings
from infra import processes
from infra.errors import InfraError
from infra.restart_policy import CrashRecord, Exit, RestartPolicy, SupervisorConfig
from infra.services import SERVICES, Service, SupervisorProcess, run_dir

log = structlog.get_logger(__name__)

POLL_S = 0.1
CHILD_STOP_GRACE_S = 20.0


def record_crash(
    settings_or_run_dir: Settings | Path, name: str, partition: int, offset: int, reason: str
) -> Path:
    """Write ``<run_dir>/<name>.crash.json`` for the supervisor; call just before exiting."""
    where = settings_or_run_dir
    directory = where if isinstance(where, Path) else run_dir(where)
    record = {"partition": partition, "offset": offset, "reason": reason}
    path = directory / f"{name}.crash.json"
    _write_atomic(path, json.dumps({**record, "at": int(time.time() * 1000)}))
    return path


def take_crash(directory: Path, name: str) -> CrashRecord | None:
    """Read and remove a service's crash record; None when there is none or it is unreadable."""
    path = directory / f"{name}.crash.json"
    try:
        data = json.loads(path.read_text())
        record = CrashRecord(
            int(data["partition"]), int(data["offset"]), str(data["reason"]), int(data["at"])
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("service.crash_record_unreadable", name=name, path=str(path), error=str(exc))
        record = None
    path.unlink(missing_ok=True)
    return record


def read_alert(directory: Path, name: str) -> dict[str, Any] | None:
    """A service's crash-loop alert, or None."""
    try:
        alert: dict[str, Any] = json.loads((directory / f"{name}.alert.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return alert


def status(settings: Settings) -> dict[str, Any]:
    """``{"supervisor": {...}, "services": {...}}`` for `flashsale infra status`."""
    directory = run_dir(settings)
    tracker = SupervisorProcess(settings)
    sup_pid = tracker.pid()
    state = tracker.state() if sup_pid is not None else {}
    known_by_name: dict[str, Any] = state.get("services", {}) if state.get("pid") == sup_pid else {}
    services = {}
    for s in (Service(n, settings) for n in SERVICES):
        known = known_by_name.get(s.name, {})
        services[s.name] = {
            "pid": s.pid(),
            "up": s.pid() is not None,
            "supervised": bool(known),
            "state": known.get("state"),
            "restarts": known.get("restarts"),
            "alert": read_alert(directory, s.name),
        }
    return {"supervisor": {"pid": sup_pid, "up": sup_pid is not None}, "services": services}


@dataclass
class _Slot:
    """One supervised service: its current child, policy and state."""

    service: Service
    policy: RestartPolicy
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    start_at: float = 0.0  # monotonic time of the next start
    state: str = "starting"  # running | backoff | crash_loop | stopped
    last_exit: int | None = None


class Supervisor:
    """Runs the named services as children until stop is set; restarts them when they exit."""

    def __init__(
        self,
        settings: Settings,
        names: Sequence[str],
        config: SupervisorConfig,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.dir = run_dir(settings)
        self.env = {
            **processes.base_env(env),  # each child gets its own login added
            "FLASHSALE_LOG_FORMAT": "json",
            "FLASHSALE_STATE_DIR": str(settings.state_dir),
            "FLASHSALE_NAMESPACE": settings.namespace,
        }
        self.slots = [_Slot(Service(n, settings), config.policy()) for n in names]
        self.tracker = SupervisorProcess(settings)

    def run(self, stop: threading.Event) -> int:
        """Supervise until stop is set, then stop every child; returns the exit code (0)."""
        self._claim()
        try:
            for slot in self.slots:
                self._prepare(slot)
            self._publish()
            log.info("supervisor.started", services=[s.service.name for s in self.slots])
            metrics = ServiceMetrics(self.settings, "supervisor")
            metrics.registry.register(_SlotsCollector(self.slots))
            with metrics.serving():
                while not stop.is_set():
                    for slot in self.slots:
                        self._tick(slot)
                    stop.wait(POLL_S)
            log.info("supervisor.stopping")
        finally:
            self._stop_children()
            self._publish()
            if processes.read_pid(self.tracker.pidfile) == os.getpid():
                self.tracker.pidfile.unlink(missing_ok=True)
        log.info("supervisor.stopped")
        return 0

    def _claim(self) -> None:
        other = self.tracker.pid()
        if other is not None and other != os.getpid():
            raise InfraError(
                f"a supervisor already runs for namespace {self.settings.namespace} (pid {other})"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tracker.pidfile.write_text(f"{os.getpid()}\n")

    def _prepare(self, slot: _Slot) -> None:
        name = slot.service.name
        for stale in (f"{name}.alert.json", f"{name}.crash.json"):
            (self.dir / stale).unlink(missing_ok=True)
        leftover = slot.service.pid()
        if leftover is not None:  # started without a supervisor: this one takes it over
            log.info("service.replaced", name=name, pid=leftover)
            slot.service.stop()

    def _tick(self, slot: _Slot) -> None:
        now = time.monotonic()
        if slot.proc is not None and slot.proc.poll() is not None:
            self._exited(slot, slot.proc, now)
        if slot.proc is None and slot.state != "crash_loop" and now >= slot.start_at:
            self._start(slot)

    def _start(self, slot: _Slot) -> None:
        name = slot.service.name
        (self.dir / f"{name}.crash.json").unlink(missing_ok=True)
        argv = [sys.executable, "-m", "flashsale.cli", name]
        env = {**self.env, **slot.service.login_env()}  # never the supervisor's own principal
        slot.proc = processes.spawn_child(argv, slot.service.logfile, env)
        slot.service.pidfile.write_text(f"{slot.proc.pid}\n")
        slot.started_at = time.monotonic()
        slot.state = "running"
        log.info("service.started", name=name, pid=slot.proc.pid, restarts=slot.policy.restarts)
        self._publish()

    def _exited(self, slot: _Slot, proc: subprocess.Popen[bytes], now: float) -> None:
        name, code = slot.service.name, proc.returncode
        slot.proc, slot.last_exit = None, code
        if processes.read_pid(slot.service.pidfile) in (None, proc.pid):
            slot.service.pidfile.unlink(missing_ok=True)
        ran_s = round(now - slot.started_at, 3)
        verdict = slot.policy.on_exit(Exit(code, ran_s, take_crash(self.dir, name)))
        crash = verdict.crash
        if verdict.restart or crash is None:
            where = {"partition": crash.partition, "offset": crash.offset} if crash else {}
            slot.start_at, slot.state = now + verdict.delay_s, "backoff"
            log.warning(
                "service.exited", name=name, pid=proc.pid, code=code, ran_s=ran_s,
                restart_in_s=verdict.delay_s, restarts=slot.policy.restarts, **where,
            )  # fmt: skip
        else:
            slot.state = "crash_loop"
            alert = {
                "service": name, "partition": crash.partition, "offset": crash.offset,
                "reason": crash.reason, "count": verdict.repeats, "code": code,
                "at": int(time.time() * 1000),
            }  # fmt: skip
            _write_atomic(self.dir / f"{name}.alert.json", json.dumps(alert))
            log.error(
                "service.crash_loop", name=name, partition=crash.partition, offset=crash.offset,
                reason=crash.reason, count=verdict.repeats, code=code,
            )  # fmt: skip
        self._publish()

    def _stop_children(self) -> None:
        for slot in reversed(self.slots):
            if slot.proc is not None:
                pid = slot.proc.pid
                processes.stop_tracked(pid, slot.service.pidfile, grace=CHILD_STOP_GRACE_S)
                slot.proc.poll()
                log.info("service.stopped", name=slot.service.name, pid=pid)
                slot.proc = None
            if slot.state != "crash_loop":
                slot.state = "stopped"

    def _publish(self) -> None:
        """Rewrite supervisor.json and supervisor.prom from the slots."""
        services = {
            s.service.name: {
                "pid": s.proc.pid if s.proc is not None else None,
                "state": s.state,
                "restarts": s.policy.restarts,
                "last_exit": s.last_exit,
                "crash_loop": s.state == "crash_loop",
            }
            for s in self.slots
        }
        state = {"pid": os.getpid(), "at": int(time.time() * 1000), "services": services}
        _write_atomic(self.tracker.statefile, json.dumps(state))
        _write_atomic(self.dir / "supervisor.prom", prometheus_text(services))


class _SlotsCollector(Collector):
    """The supervisor's ``/metrics``: restarts and liveness per service (as supervisor.prom)."""

    def __init__(self, slots: Sequence[_Slot]) -> None:
        self.slots = slots

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily("flashsale_service_restarts", "Restarts by the supervisor.",
                                       labels=["service"])  # fmt: skip
        up = GaugeMetricFamily("flashsale_service_up", "1 while the service's child runs.",
                               labels=["service"])  # fmt: skip
        for slot in self.slots:
            restarts.add_metric([slot.service.name], slot.policy.restarts)
            up.add_metric([slot.service.name], int(slot.proc is not None))
        yield restarts
        yield up


def prometheus_text(services: Mapping[str, Mapping[str, Any]]) -> str:
    """The supervisor's metrics in Prometheus text exposition format."""
    families = (
        ("flashsale_service_restarts_total", "counter", "Restarts by the supervisor.",
         lambda s: s["restarts"]),
        ("flashsale_service_up", "gauge", "1 while the service's child runs.",
         lambda s: int(s["pid"] is not None)),
        ("flashsale_service_crash_loop", "gauge", "1 when restarts stopped on a crash loop.",
         lambda s: int(s["crash_loop"])),
    )  # fmt: skip
    lines: list[str] = []
    for metric, kind, help_text, value in families:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines += [f'{metric}{{service="{n}"}} {value(s)}' for n, s in services.items()]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
