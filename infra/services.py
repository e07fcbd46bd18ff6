"""The project's own long-running services (processor, projector, analytics, sale clock,
payment service) as detached processes."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashsale import intent_sig, kafka_auth
from flashsale.settings import Settings
from infra import processes
from infra.errors import InfraError

SERVICES = ("processor", "projector", "analytics", "clock", "payments")


def run_dir(settings: Settings) -> Path:
    """Where the services of settings.namespace keep pid files, logs and supervision files."""
    return settings.state_dir / "run" / settings.namespace


@dataclass(frozen=True)
class Service:
    """One `flashsale <name>` process, tracked by a pid file under state_dir/run."""

    name: str
    settings: Settings

    @property
    def run_dir(self) -> Path:
        return run_dir(self.settings)

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """Pid of the running service, or None."""
        return processes.read_pid(self.pidfile)

    def start(self, env: dict[str, str] | None = None) -> bool:
        """Start unless running; True if started now."""
        if self.pid() is not None:
            return False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "flashsale.cli", self.name]
        # The child runs with this service's settings, whatever the caller's environment says.
        full_env = {
            **processes.base_env(),
            "FLASHSALE_LOG_FORMAT": "json",
            "FLASHSALE_STATE_DIR": str(self.settings.state_dir),
            "FLASHSALE_NAMESPACE": self.settings.namespace,
            **(env or {}),
            **self.login_env(),
        }
        pid = processes.spawn(argv, self.logfile, self.pidfile, env=full_env)
        if processes.wait_until(lambda: not processes.alive(pid), 1.5):
            raise InfraError(
                f"{self.name} exited at start; log:\n{processes.log_tail(self.logfile)}"
            )
        return True

    def stop(self) -> bool:
        """Stop (SIGTERM, then SIGKILL). True if it was running."""
        return processes.stop_tracked(self.pid(), self.pidfile, grace=20.0)

    def login_env(self) -> dict[str, str]:
        """Its own Kafka principal (and the intent key if it checks intents), whoever starts
        it; nothing without auth."""
        user = kafka_auth.PRINCIPALS[self.name]
        env = kafka_auth.login_env(self.settings, user)
        return {**env, **intent_sig.key_env(self.settings)} if user in kafka_auth.SIGNERS else env


@dataclass(frozen=True)
class ExtraWorker(Service):
    """A further writer worker of the namespace (``name`` is "processor"): its own static
    member id, RocksDB directory, pid file and log (README: adding a worker during a sale)."""

    worker_id: int = 1

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"w{self.worker_id}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"w{self.worker_id}.log"

    @property
    def datadir(self) -> Path:
        ns = self.settings.namespace
        return self.settings.state_dir / "processor" / f"{ns}-w{self.worker_id}"

    def start(self, env: dict[str, str] | None = None) -> bool:
        return super().start({**(env or {}), "FLASHSALE_WORKER_ID": str(self.worker_id),
                              "FLASHSALE_PROCESSOR_DATADIR": str(self.datadir)})  # fmt: skip


def extra_workers(settings: Settings) -> list[ExtraWorker]:
    """The namespace's further writer workers that have a pid file (running or not)."""
    ids = sorted(int(p.stem[1:]) for p in run_dir(settings).glob("w*.pid") if p.stem[1:].isdigit())
    return [ExtraWorker("processor", settings, i) for i in ids]


def all_services(settings: Settings) -> list[Service]:
    """Every service of the stack, in start order."""
    return [Service(name, settings) for name in SERVICES]


@dataclass(frozen=True)
class SupervisorProcess:
    """`flashsale supervise` as a detached process: it starts, watches and restarts services."""

    settings: Settings
    services: tuple[str, ...] = SERVICES

    @property
    def pidfile(self) -> Path:
        return run_dir(self.settings) / "supervisor.pid"

    @property
    def logfile(self) -> Path:
        return run_dir(self.settings) / "supervisor.log"

    @property
    def statefile(self) -> Path:
        return run_dir(self.settings) / "supervisor.json"

    def pid(self) -> int | None:
        """Pid of the running supervisor, or None."""
        return processes.read_pid(self.pidfile)

    def state(self) -> dict[str, Any]:
        """What the supervisor last wrote (its pid, each service's state), or {} if nothing."""
        try:
            state: dict[str, Any] = json.loads(self.statefile.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return state

    def start(self, env: dict[str, str] | None = None, timeout: float = 15.0) -> bool:
        """Start unless running and wait for its services' first start; True if started now."""
        if self.pid() is not None:
            return False
        argv = [sys.executable, "-m", "flashsale.cli", "supervise", "--services", *self.services]
        full_env = {
            **processes.base_env(),
            "FLASHSALE_LOG_FORMAT": "json",
            "FLASHSALE_STATE_DIR": str(self.settings.state_dir),
            "FLASHSALE_NAMESPACE": self.settings.namespace,
            **(env or {}),
        }
        pid = processes.spawn(argv, self.logfile, self.pidfile, env=full_env)

        def first_starts_done() -> bool:
            state = self.state()
            services = state.get("services", {}) if state.get("pid") == pid else {}
            return all(
                services.get(n, {}).get("state", "starting") != "starting" for n in self.services
            )

        processes.wait_until(lambda: not processes.alive(pid) or first_starts_done(), timeout)
        if not processes.alive(pid):
            raise InfraError(
                f"the supervisor exited at start; log:\n{processes.log_tail(self.logfile)}"
            )
        return True

    def stop(self, grace: float = 60.0) -> bool:
        """SIGTERM the supervisor (it stops its services first), SIGKILL after grace seconds."""
        return processes.stop_tracked(self.pid(), self.pidfile, grace=grace)
