"""`flashsale supervise` with real processes: restarts, crash loops, and no orphans.

The projector is the supervised service here (the processor is exercised elsewhere); its
test hook FLASHSALE_FAULT_EXIT_AT_START makes it record a crash and exit at start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flashsale.settings import Settings
from flashsale.topics import catalogue
from infra import processes, provision
from infra.services import Service, SupervisorProcess, run_dir
from infra.stack import Endpoints
from tests.conftest import log_events

pytestmark = pytest.mark.slow

FAST_BACKOFF = {"FLASHSALE_SUPERVISE_BACKOFF_S": "0.1", "FLASHSALE_SUPERVISE_BACKOFF_MAX_S": "0.2"}


@dataclass
class Namespace:
    """A private namespace with its topics, and the environment its processes run with."""

    settings: Settings
    env: dict[str, str]
    popens: list[subprocess.Popen[bytes]]

    @property
    def run_dir(self) -> Path:
        return run_dir(self.settings)

    @property
    def projector(self) -> Service:
        return Service("projector", self.settings)

    def supervise(self, *services: str) -> subprocess.Popen[bytes]:
        """`flashsale supervise --services ...` as a child of the test, logging to a file."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "supervisor.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flashsale.cli", "supervise", "--services", *services],
                env={**os.environ, **self.env, "FLASHSALE_LOG_FORMAT": "json"},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.popens.append(proc)
        return proc

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flashsale.cli", *argv],
            env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def log_events(self, event: str, log: str = "supervisor") -> list[dict[str, Any]]:
        return log_events(self.run_dir / f"{log}.log", event)

    def wait_for_projector_running(self, times: int = 1) -> None:
        """Until the projector has logged its start `times` times (it consumes from then on)."""

        def started() -> bool:
            return len(self.log_events("projection.started", "projector")) >= times

        assert processes.wait_until(started, 30), processes.log_tail(self.projector.logfile)


@pytest.fixture
def ns(settings: Settings, endpoints: Endpoints, uid: str) -> Iterator[Namespace]:
    s = dataclasses.replace(settings, namespace=f"t-{uid}")
    provision.ensure_topics(endpoints.bootstrap, catalogue(s))
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.bootstrap,
        "DATABASE_URL": endpoints.dsn,
        "FLASHSALE_INFRA": "external",
        "FLASHSALE_STATE_DIR": str(s.state_dir),
        "FLASHSALE_NAMESPACE": s.namespace,
        **FAST_BACKOFF,
    }
    space = Namespace(s, env, [])
    yield space
    for proc in space.popens:  # whatever a failed test left behind
        if proc.poll() is None:
            processes.terminate(proc.pid, grace=30)
    SupervisorProcess(s).stop()
    space.projector.stop()


def wait_for_pid(service: Service, other_than: int | None = None, timeout: float = 20) -> int:
    assert processes.wait_until(lambda: service.pid() not in (None, other_than), timeout, 0.1)
    pid = service.pid()
    assert pid is not None
    return pid


def test_a_killed_service_is_restarted_and_sigterm_leaves_no_child(ns: Namespace):
    supervisor = ns.supervise("projector")
    first = wait_for_pid(ns.projector)
    ns.wait_for_projector_running()

    os.kill(first, signal.SIGKILL)
    second = wait_for_pid(ns.projector, other_than=first)
    ns.wait_for_projector_running(times=2)
    assert processes.alive(second)
    assert not processes.alive(first)
    status = json.loads(ns.cli("infra", "status", "--json").stdout)
    assert status["supervisor"] == {"pid": supervisor.pid, "up": True}
    projector = status["services"]["projector"]
    assert projector["pid"] == second and projector["restarts"] == 1 and projector["alert"] is None
    metrics = (ns.run_dir / "supervisor.prom").read_text()
    assert 'flashsale_service_restarts_total{service="projector"} 1\n' in metrics
    [exited] = ns.log_events("service.exited")
    assert exited["code"] == -signal.SIGKILL and exited["pid"] == first

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    assert not processes.alive(second), "the supervisor's child outlived it"
    assert ns.projector.pid() is None
    assert not (ns.run_dir / "supervisor.pid").exists()


def test_a_killed_supervisor_takes_its_children_down(ns: Namespace):
    supervisor = ns.supervise("projector")
    child = wait_for_pid(ns.projector)
    ns.wait_for_projector_running()
    os.kill(supervisor.pid, signal.SIGKILL)  # no chance to stop its children itself
    supervisor.wait(timeout=10)
    assert processes.wait_until(lambda: not processes.alive(child), 30), "orphan left running"
    [signalled] = ns.log_events("projection.signal", "projector")
    assert signalled["signal"] == "SIGTERM", "the child is told to stop when its parent dies"


def test_the_same_crash_limit_times_in_a_row_stops_restarts_and_raises_an_alert(ns: Namespace):
    tracker = SupervisorProcess(ns.settings, ("projector",))
    env = {**ns.env, "FLASHSALE_SUPERVISE_CRASH_LIMIT": "3", "FLASHSALE_FAULT_EXIT_AT_START": "17"}
    assert tracker.start(env) is True
    alert_file = ns.run_dir / "projector.alert.json"
    assert processes.wait_until(alert_file.exists, 30, 0.1), processes.log_tail(tracker.logfile)

    status = json.loads(ns.cli("infra", "status", "--json").stdout)
    assert status["supervisor"]["up"] is True, "the supervisor itself keeps running"
    projector = status["services"]["projector"]
    assert projector["up"] is False and projector["state"] == "crash_loop"
    assert projector["restarts"] == 2
    alert = projector["alert"]
    assert (alert["partition"], alert["offset"], alert["count"]) == (0, 17, 3)
    assert alert["reason"] == "injected fault" and alert["code"] == 70
    text = ns.cli("infra", "status").stdout
    assert "ALERT     projector crash loop: 3 crashes in a row at partition 0 offset 17" in text

    [loop] = ns.log_events("service.crash_loop")
    assert loop["level"] == "error"
    assert (loop["name"], loop["partition"], loop["offset"], loop["count"]) == (
        "projector",
        0,
        17,
        3,
    )
    assert len(ns.log_events("service.started")) == 3, "no start after the crash loop"
    metrics = (ns.run_dir / "supervisor.prom").read_text()
    assert 'flashsale_service_crash_loop{service="projector"} 1\n' in metrics
    assert not (ns.run_dir / "projector.crash.json").exists(), "records are consumed"

    # The operator fixes the cause and restarts the supervisor: the alert is cleared.
    assert tracker.stop() is True
    assert tracker.start(ns.env) is True
    assert not alert_file.exists()
    wait_for_pid(ns.projector)
    assert (
        json.loads(ns.cli("infra", "status", "--json").stdout)["services"]["projector"]["alert"]
        is None
    )
    assert tracker.stop() is True
    # The supervisor has stopped its child; a child that was just starting may take a moment.
    assert processes.wait_until(lambda: ns.projector.pid() is None, 15)
