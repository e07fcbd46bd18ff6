"""The HTTP edge as one unit: N app servers (uvicorn processes) behind one nginx."""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashsale import intent_sig, kafka_auth
from flashsale.settings import Settings, env_int, env_number
from infra import processes
from infra.errors import InfraError
from infra.nginx import LocalNginx

DEFAULT_SERVERS = 2
READY_TIMEOUT_S = 30.0


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except Exception:  # connection refused, timeout, HTTP error: not healthy
        return 0


@dataclass(frozen=True)
class AppServer:
    """One `python -m producers.http.server --port N`, tracked by its own pid file."""

    settings: Settings
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.settings.state_dir / "run" / self.settings.namespace / "http"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"app-{self.port}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"app-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        """Pid of the running app server, or None."""
        return processes.read_pid(self.pidfile)

    def healthy(self) -> bool:
        """True when /healthz answers 200."""
        return _get(self.url + "/healthz") == 200

    def start(self, wait: bool = True) -> bool:
        """Start unless running; with wait, until /healthz answers. True if started now."""
        if self.pid() is not None:
            return False
        processes.require_free_port(self.port, "an app server", "FLASHSALE_HTTP_PORT")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "producers.http.server", "--port", str(self.port)]
        env = {
            **processes.base_env(),
            "FLASHSALE_LOG_FORMAT": "json",
            "FLASHSALE_STATE_DIR": str(self.settings.state_dir),
            "FLASHSALE_NAMESPACE": self.settings.namespace,
            **self.env,
            **kafka_auth.login_env(self.settings, kafka_auth.PRINCIPALS["http"]),
            **intent_sig.key_env(self.settings),  # the edge signs the intents it writes
        }
        pid = processes.spawn(argv, self.logfile, self.pidfile, env=env)
        if wait:
            self.wait_ready(pid)
        return True

    def wait_ready(self, pid: int | None = None) -> None:
        """Wait until /healthz answers; InfraError with the log tail if it never does."""
        pid = pid or self.pid()
        ok = processes.wait_until(
            lambda: self.healthy() or pid is None or not processes.alive(pid),
            READY_TIMEOUT_S,
            0.1,
        )
        if not ok or not self.healthy():
            raise InfraError(
                f"app server on {self.port} did not start; log:\n{processes.log_tail(self.logfile)}"
            )

    def stop(self) -> bool:
        """Stop (SIGTERM, then SIGKILL). True if it was running."""
        return processes.stop_tracked(self.pid(), self.pidfile, grace=10.0)


class Edge:
    """nginx on settings.http_port in front of app servers on the following ports."""

    def __init__(
        self,
        settings: Settings,
        servers: int | None = None,
        server_ports: Sequence[int] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        n = servers or env_int(os.environ, "FLASHSALE_HTTP_SERVERS", DEFAULT_SERVERS, 1, 64)
        ports = tuple(server_ports or range(settings.http_port + 1, settings.http_port + 1 + n))
        self.settings = settings
        self.servers = [AppServer(settings, p, dict(env or {})) for p in ports]
        given = {**os.environ, **(env or {})}  # the servers' env may carry nginx's limit too
        rate = env_number(given, "FLASHSALE_ADDR_RATE_PER_S", 0.0, 0.0, 1e6)
        burst = env_int(given, "FLASHSALE_ADDR_RATE_BURST", 20, 0, 1_000_000)
        limit = (rate, burst) if rate > 0 else None
        self.nginx = LocalNginx(settings.state_dir, settings.http_port, ports, limit,
                                settings.https_port)  # fmt: skip

    @property
    def url(self) -> str:
        return self.nginx.url

    def up(self) -> dict[str, bool]:
        """Start what is not running (app servers first, then nginx); wait until ready. If
        anything fails to start, what this call started is stopped again."""
        started: dict[str, bool] = {}
        nginx_ran = self.nginx.pid() is not None
        try:
            for s in self.servers:
                started[f"app-{s.port}"] = s.start(wait=False)
            for s in self.servers:
                s.wait_ready()
            started["nginx"] = self.nginx.start()
        except BaseException:
            if not nginx_ran:
                self.nginx.stop()  # spawned but not listening in time: not left behind
            for s in self.servers:
                if started.get(f"app-{s.port}"):
                    s.stop()
            raise
        return started

    def down(self) -> dict[str, bool]:
        """Stop nginx, then the app servers: ours and any other of the namespace still
        running (one the autoscaler added, if it was killed before it could stop it)."""
        stopped = {"nginx": self.nginx.stop()}
        stopped.update({f"app-{s.port}": s.stop() for s in self.servers})
        ours = {s.port for s in self.servers}
        run = self.servers[0].run_dir if self.servers else None
        for pidfile in sorted(run.glob("app-*.pid")) if run else ():
            port = int(pidfile.stem.removeprefix("app-"))
            if port not in ours:
                stopped[f"app-{port}"] = AppServer(self.settings, port).stop()
        return stopped

    def status(self) -> dict[str, Any]:
        """``{"http": {...}}`` for `flashsale infra status --json`."""
        up = self.nginx.pid() is not None and _get(self.url + "/healthz") == 200
        return {
            "http": {
                "url": self.url,
                "up": up,
                "nginx_pid": self.nginx.pid(),
                "servers": [
                    {"url": s.url, "pid": s.pid(), "up": s.pid() is not None and s.healthy()}
                    for s in self.servers
                ],
            }
        }
