"""Failover between two writer workers, with and without standby replicas, side by side.

Each variant runs in a namespace of its own: worker 0 (under the supervisor) and worker 1
share the partitions; N intents over 60 SKUs are decided; worker 1 is SIGKILLed; then one
new intent per SKU is written (every partition gets one) and timed until all are decided by
worker 0. With ``FLASHSALE_STANDBY_REPLICAS=1`` worker 0 has kept a warm copy of worker 1's
partitions (Faust's standby recovery over the changelog); without, it restores them from the
changelog when they are assigned. Figures, never asserted:

* ``takeover_s``: the kill to the last of the new decisions. It includes the group's session
  timeout (10 s: a static member killed is noticed only then), the same in both variants;
* ``loaded_after_kill_s``: the kill to worker 0's last ``state.loaded`` of a moved partition
  (its changelog restored and its state folded);
* ``worker0_rocksdb_mb_before_kill``: worker 0's RocksDB on disk before the kill (the warm copy
  shows here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flashsale.settings import Settings
from flashsale.writer_bench import DecisionReader, Namespace
from infra import processes
from infra.services import ExtraWorker

SKUS = [f"sku-{i:03d}" for i in range(60)]


def _mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
    return round(total / 2**20, 1)


def _loaded_at(log: Path, after: float) -> list[float]:
    """Wall times of the ``state.loaded`` lines of ``log`` after ``after``."""
    times = []
    for line in log.read_text().splitlines() if log.exists() else ():
        if '"state.loaded"' not in line:
            continue
        try:
            stamp = datetime.fromisoformat(json.loads(line)["timestamp"]).timestamp()
        except (ValueError, KeyError):
            continue
        if stamp > after:
            times.append(stamp)
    return times


def _variant(settings: Settings, broker_pid: int | None, n: int, standby: int) -> dict[str, Any]:
    ns = Namespace(settings, f"failover{standby}", broker_pid)
    ns.env["FLASHSALE_STANDBY_REPLICAS"] = str(standby)
    ns.env["FLASHSALE_LOG_LEVEL"] = "INFO"  # state.loaded: which worker took what, when
    second = ExtraWorker("processor", ns.settings, 1)
    try:
        ns.open_sale(SKUS, allocation=n, per_user=n)
        reader = DecisionReader(ns.bootstrap, ns.names.decisions)
        ns.start()
        ns.wait_ready()
        second.start(ns.env)
        sent = 1  # the readiness probe
        deadline = time.monotonic() + 120
        while not _loaded_at(second.logfile, 0):  # until the group has shared the partitions
            if time.monotonic() > deadline:
                raise RuntimeError("worker 1 was given no partition; its log:\n"
                                   + processes.log_tail(second.logfile))  # fmt: skip
            ns.intents(len(SKUS), SKUS, 1, prefix=f"join{sent}-")
            sent += len(SKUS)
            time.sleep(1)
        ns.intents(n, SKUS, max(1, n // 4))
        reader.wait(sent + n, 1800)
        time.sleep(5)  # a standby follows the changelog: let it catch up
        before = _mb(ns.datadir)
        had = reader.count
        killed = time.time()
        t0 = time.monotonic()
        victim = second.pid()
        if victim is None:  # never kill(0): that is this process's own group
            raise RuntimeError("worker 1 exited before the kill; its log:\n"
                               + processes.log_tail(second.logfile))  # fmt: skip
        os.kill(victim, signal.SIGKILL)
        ns.intents(len(SKUS), SKUS, 1, prefix="after-")
        reader.wait(had + len(SKUS), 600)
        took = time.monotonic() - t0
        loaded = _loaded_at(ns.worker.logfile, killed)
        reader.close()
        return {
            "decided_before_kill": had,
            "decided_after_kill": reader.count - had,
            "takeover_s": round(took, 2),
            "loaded_after_kill_s": round(max(loaded) - killed, 2) if loaded else None,
            "partitions_moved": len(loaded),
            "worker0_rocksdb_mb_before_kill": before,
            "worker0_restarts": ns.restarts(),
        }
    finally:
        second.stop()
        ns.drop()
        shutil.rmtree(second.datadir, ignore_errors=True)


def failover(settings: Settings, broker_pid: int | None, n: int) -> dict[str, Any]:
    """Both variants, one after the other in one run: standby replicas off, then on."""
    return {f"standby_{k}": _variant(settings, broker_pid, n, k) for k in (0, 1)}
