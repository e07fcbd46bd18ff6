"""The writer under faults, mid-sale, with the whole system around it (HTTP, holds, payments,
the sale clock, both projections): killed, stopped, joined by a second worker and left by the
first, paused past its timeouts, its local state deleted, its disk full."""

from __future__ import annotations

import os
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from flashsale.settings import Settings
from infra import processes
from infra.services import ExtraWorker
from infra.stack import Endpoints
from processors.app import default_datadir
from tests.conftest import local_only
from tests.faults.checks import answer_times, verify
from tests.faults.harness import (
    Hit,
    Sale,
    System,
    now_ms,
    open_sale,
    plan_sale,
    run_sale,
    whole_system,
)
from tests.integration.pipeline import partition_of

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.destructive]


def _stop_writer(system: System, sig: int) -> Hit:
    """Signal the writer, wait until it is gone, start its replacement (the supervisor's job,
    done here by the harness that started it)."""
    processor = system.pipeline.processor
    pid = processor.pid()
    assert pid is not None, "no writer to stop"
    hit = Hit(now_ms(), detail={"pid": pid, "signal": signal.Signals(sig).name})
    os.kill(pid, sig)
    assert processes.wait_until(lambda: not processes.alive(pid), 60), "the writer outlived it"
    processor.start(system.env)
    hit.ended_ms = now_ms()
    return hit


def _decided_before_and_after(system: System, sale: Sale) -> tuple[int, int]:
    """Answers the writer appended for the sale before the fault and after it (by their own
    log times): the fault landed mid-sale when both are non-zero."""
    assert sale.hit is not None
    at = sale.hit.at_ms
    times = [t for _, r, t in answer_times(system) if r.get("sale_id") == sale.sale_id]
    return sum(1 for t in times if t < at), sum(1 for t in times if t >= at)


STOPS = [
    pytest.param(sig, at, id=f"{sig.name}-{round(at * 100)}%",
                 marks=[pytest.mark.ci] if (sig, at) == (signal.SIGTERM, 0.4) else [])
    for sig in (signal.SIGKILL, signal.SIGTERM) for at in (0.2, 0.4, 0.6)
]  # fmt: skip


@pytest.mark.parametrize(("sig", "at"), STOPS)
def test_writer_stopped_mid_sale_loses_and_doubles_nothing(
    settings: Settings, endpoints: Endpoints, sig: signal.Signals, at: float
) -> None:
    """Killed (or stopped cleanly) at a fifth, two fifths and three fifths of the crowd; the
    harness starts the replacement. (CI runs SIGTERM at 40%.)"""
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale()
        open_sale(system, sale)
        run_sale(system, sale, lambda s, _: _stop_writer(s, sig), at)
        figures = verify(system, sale, f"writer {sig.name} at {at:.0%}")
        before, after = _decided_before_and_after(system, sale)
        assert before > 0 and after > 0, f"the stop did not land mid-sale ({before}, {after})"
        assert figures.recover_ms is not None  # a decision came after the replacement started
        crashed = system.log_events("processor", "processor.crashed")
        if sig == signal.SIGTERM:
            assert crashed == [], "a clean stop is no crash"


def test_writer_killed_between_produce_and_commit_has_its_work_redone(
    settings: Settings, endpoints: Endpoints
) -> None:
    """The fault hook kills the writer after a batch's decisions were flushed to the broker,
    before its transaction committed: those decisions are aborted, and redone by the next."""
    local_only(settings)
    sale = plan_sale()
    partition = partition_of(sale.skus[0], settings.partitions)
    # Past the sale's openings and the clock's first ticks, about a fifth into its intents.
    fault = {"FLASHSALE_FAULT": f"kill:before-commit:{partition}:150"}
    with whole_system(settings, endpoints, fault) as system:
        open_sale(system, sale)

        def wait_for_the_hook(system: System, _: Sale) -> Hit:
            pid = system.pipeline.processor.pid()
            assert processes.wait_until(lambda: not processes.alive(pid), 120), "never fired"
            hit = Hit(now_ms(), detail={"pid": pid})
            system.pipeline.processor.start({k: v for k, v in system.env.items()
                                             if k != "FLASHSALE_FAULT"})  # fmt: skip
            hit.ended_ms = now_ms()
            return hit

        system.pipeline.env.pop("FLASHSALE_FAULT")  # later restarts run without it
        run_sale(system, sale, wait_for_the_hook, 0.0)
        verify(system, sale, "writer SIGKILL between produce and commit")
        [fired] = system.log_events("processor", "fault.injected")
        assert fired["point"] == "before-commit"


@pytest.mark.ci
def test_a_worker_joins_and_the_first_leaves_mid_sale(
    settings: Settings, endpoints: Endpoints
) -> None:
    """Scale-out mid-sale: a second worker joins (the partitions are shared out, its tables
    recovered from the changelogs), then the first leaves (all partitions move to the second)."""
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale()
        open_sale(system, sale)

        def rebalance(system: System, sale: Sale) -> Hit:
            hit = Hit(now_ms())
            second = _second_worker(system)
            assert system.pipeline.processor.pid() is not None
            hit.detail = {"joined_partitions": second.logfile.read_text().count('"state.loaded"')}
            system.pipeline.processor.stop()  # SIGTERM: the first leaves the group
            hit.ended_ms = now_ms()
            return hit

        run_sale(system, sale, rebalance, 0.2, pace_s=0.05)
        verify(system, sale, "a worker joins, the first leaves")
        assert sale.hit is not None
        # A rebalance is no crash (the first worker's commit as it began crashed it, once).
        log = ExtraWorker("processor", system.settings, 1).logfile
        assert system.log_events("processor", "processor.crashed") == []
        assert '"processor.crashed"' not in log.read_text()
        left = sale.hit.ended_ms  # from here the second worker decided alone
        alone = [t for _, r, t in answer_times(system) if r.get("sale_id") == sale.sale_id
                 and t > left]  # fmt: skip
        assert alone, "nothing was decided after the first worker left"


def test_with_standby_replicas_a_worker_joins_dies_and_its_partitions_come_back(
    settings: Settings, endpoints: Endpoints
) -> None:
    """Standby replicas on (``FLASHSALE_STANDBY_REPLICAS=1``): a second worker joins (the
    first keeps a warm copy of the partitions it gave away), then is SIGKILLed; its
    partitions come back to the first, which decides them without a crash. (Faust kept the
    first worker's producers of those partitions through the standby spell; the second
    fenced them, and the first, reusing them, crashed on its first commit.)"""
    local_only(settings)
    with whole_system(settings, endpoints, {"FLASHSALE_STANDBY_REPLICAS": "1"}) as system:
        sale = plan_sale()
        open_sale(system, sale)

        def join_then_die(system: System, sale: Sale) -> Hit:
            hit = Hit(now_ms())
            second = _second_worker(system)  # the first follows the second's changelog
            pid = second.pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            hit.detail = {"killed": pid}
            hit.ended_ms = now_ms()
            return hit

        run_sale(system, sale, join_then_die, 0.2, pace_s=0.05)
        verify(system, sale, "standby replicas: a worker joins and is killed")
        assert sale.hit is not None
        assert system.log_events("processor", "processor.crashed") == []
        # The path that crashed: a partition the first worker gave away (its producer dropped)
        # came back to it after the kill, and it decided there again.
        given = {int(e["transactional_id"].rsplit("-", 1)[1])
                 for e in system.log_events("processor", "txn.producer_dropped")}  # fmt: skip
        back_again = {e["partition"] for e in system.log_events("processor", "state.loaded")
                      if _stamp_ms(e) > sale.hit.ended_ms}  # fmt: skip
        assert given & back_again, (given, back_again)
        back = [t for _, r, t in answer_times(system) if r.get("sale_id") == sale.sale_id
                and t > sale.hit.ended_ms]  # fmt: skip
        assert back, "nothing was decided after the second worker died"


def test_a_worker_paused_past_its_timeouts_is_fenced_and_replaced(
    settings: Settings, endpoints: Endpoints
) -> None:
    """The fault hook SIGSTOPs the writer with a batch's decisions flushed and its transaction
    not committed (a pause at a random moment once found nothing in flight, and a worker with
    nothing in flight rightly goes on). Past the session and transaction timeouts it is
    SIGCONTed: its transaction was aborted, so it must exit, and its replacement redo it."""
    local_only(settings)
    sale = plan_sale()
    partition = partition_of(sale.skus[0], settings.partitions)
    env = {"FLASHSALE_TRANSACTION_TIMEOUT_MS": "3000",
           "FLASHSALE_FAULT": f"stop:before-commit:{partition}:150"}  # fmt: skip
    with whole_system(settings, endpoints, env) as system:
        open_sale(system, sale)

        def pause(system: System, _: Sale) -> Hit:
            pid = system.pipeline.processor.pid()
            assert pid is not None
            assert processes.wait_until(lambda: _stopped(pid), 120), "the hook never fired"
            hit = Hit(now_ms(), detail={"pid": pid})
            time.sleep(12)  # past the 10 s session and the 3 s transaction timeouts
            os.kill(pid, signal.SIGCONT)
            hit.detail["exited"] = processes.wait_until(lambda: not processes.alive(pid), 20)
            if not hit.detail["exited"]:
                return hit
            system.pipeline.processor.start(system.env)
            hit.ended_ms = now_ms()
            return hit

        system.pipeline.env.pop("FLASHSALE_FAULT")  # the replacement runs without it
        run_sale(system, sale, pause, 0.0, pace_s=0.05)
        verify(system, sale, "writer SIGSTOP past its timeouts, SIGCONT")
        assert sale.hit is not None and sale.hit.detail["exited"], "it went on, aborted work lost"
        [fired] = system.log_events("processor", "fault.injected")
        assert (fired["action"], fired["point"]) == ("stop", "before-commit")
        [crashed] = system.log_events("processor", "processor.crashed")
        # Its transaction was aborted meanwhile: it exits on the watchdog, on the fenced
        # commit, or on the revocation of partitions with uncommitted output.
        reasons = ("stalled", "Fenced", "transaction", "uncommitted", "records would be skipped")
        assert any(w in crashed["reason"] for w in reasons), crashed["reason"]


def test_a_worker_whose_local_state_is_deleted_rebuilds_it(
    settings: Settings, endpoints: Endpoints
) -> None:
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale()
        open_sale(system, sale)

        def wipe(system: System, _: Sale) -> Hit:
            hit = Hit(now_ms())
            system.pipeline.processor.stop()
            datadir = default_datadir(system.settings)
            hit.detail = {"files_deleted": sum(1 for p in datadir.rglob("*") if p.is_file())}
            shutil.rmtree(datadir)
            system.pipeline.processor.start(system.env)
            hit.ended_ms = now_ms()
            return hit

        run_sale(system, sale, wipe, 0.4)
        verify(system, sale, "writer's RocksDB deleted, restarted")
        assert sale.hit is not None and sale.hit.detail["files_deleted"] > 0
        # The restart found its sale's state again (recovered from the changelog): it resumed
        # mid-log with the SKU's ledger, instead of from nothing.
        part = partition_of(sale.skus[0], settings.partitions)
        loads = [
            e for e in system.log_events("processor", "state.loaded") if e["partition"] == part
        ]
        assert len(loads) >= 2 and loads[-1]["resume_at"] > 0 and loads[-1]["skus"] >= 1, loads


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (by a signal)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _second_worker(system: System) -> ExtraWorker:
    """A second writer worker, started and given a partition; both decide for 2 s."""
    second = ExtraWorker("processor", system.settings, 1)
    system.extra.append(second)
    second.start(system.env)

    def loaded() -> bool:
        return second.logfile.exists() and '"state.loaded"' in second.logfile.read_text()

    assert processes.wait_until(loaded, 60), "the second worker was given no partition"
    time.sleep(2)
    return second


def _stamp_ms(event: dict) -> int:
    """A JSON log line's time (structlog's ISO timestamp) in ms since the epoch."""
    return int(datetime.fromisoformat(event["timestamp"]).timestamp() * 1000)
