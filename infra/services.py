"""The project's own long-running services (processor, projector) as detached processes."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flashsale.settings import Settings
from infra import processes
from infra.errors import InfraError

SERVICES = ("processor", "projector")


@dataclass(frozen=True)
class Service:
    """One `flashsale <name>` process, tracked by a pid file under state_dir/run."""

    name: str
    settings: Settings

    @property
    def run_dir(self) -> Path:
        return self.settings.state_dir / "run" / self.settings.namespace

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
            **os.environ,
            "FLASHSALE_LOG_FORMAT": "json",
            "FLASHSALE_STATE_DIR": str(self.settings.state_dir),
            "FLASHSALE_NAMESPACE": self.settings.namespace,
            **(env or {}),
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


def all_services(settings: Settings) -> list[Service]:
    """Every service of the stack, in start order."""
    return [Service(name, settings) for name in SERVICES]
