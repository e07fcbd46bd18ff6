"""A redis-server of the benchmark's own (the Debian package's binary), started and stopped by
it, with its data under the project's state dir. Nothing else in flashsale uses Redis."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra import processes
from infra.errors import InfraError
from infra.processes import find_binary

INSTALL_HINT = "apt-get install -y redis-server"


def redis_binary(name: str) -> str:
    """``redis-server``, ``redis-benchmark`` or ``redis-cli``, or MissingBinary with the fix."""
    return find_binary(name, "FLASHSALE_" + name.upper().replace("-", "_"), INSTALL_HINT)


@dataclass(frozen=True)
class LocalRedis:
    """redis-server on 127.0.0.1:``port``, append-only file on, fsync ``always`` or
    ``everysec``; ``home`` is wiped on start and on stop."""

    home: Path
    port: int
    appendfsync: str = "everysec"

    @property
    def pidfile(self) -> Path:
        return self.home / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.home / "redis.log"

    def pid(self) -> int | None:
        return processes.read_pid(self.pidfile)

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [redis_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    def answers(self) -> bool:
        try:
            return self.cli("PING") == "PONG"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False

    def start(self) -> None:
        if self.appendfsync not in ("always", "everysec"):
            raise ValueError(f"appendfsync must be always or everysec, not {self.appendfsync!r}")
        shutil.rmtree(self.home, ignore_errors=True)
        (self.home / "data").mkdir(parents=True)
        processes.require_free_port(self.port, "redis-server", "FLASHSALE_REDIS_PORT")
        argv = [
            redis_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.home / "data"), "--appendonly", "yes",
            "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
        ]  # fmt: skip
        pid = processes.spawn(argv, self.logfile, self.pidfile)
        if not processes.wait_until(lambda: self.answers() or not processes.alive(pid), 15, 0.1):
            self.stop()
            raise InfraError(f"redis-server did not start:\n{processes.log_tail(self.logfile)}")
        if not self.answers():
            raise InfraError(f"redis-server exited:\n{processes.log_tail(self.logfile)}")

    def stop(self) -> None:
        processes.stop_tracked(self.pid(), self.pidfile, grace=10.0)
        shutil.rmtree(self.home, ignore_errors=True)
