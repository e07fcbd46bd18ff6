"""What the writer's agent and its Faust transport share: the batch gate, progress, commits
driven as soon as work waits, the watchdog, test-only faults and the crash exit.

Nothing here touches Faust's internals (those live in ``processors/faust_runtime.py``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from faust.types import TP

log = structlog.get_logger("processors.runtime")

CRASH_EXIT = 70
PROGRESS_EVERY_S = 10.0
INPUT_CHECK_EVERY_S = 5.0


@dataclass(frozen=True)
class Fault:
    """A test-only fault (``FLASHSALE_FAULT=action:point:partition:offset``)."""

    action: str  # raise | kill | rewind (seek the partition back to ``rewind_to``) | enospc
    #   | drop (a fetched batch is lost before it reaches the agent: its records are skipped)
    #   | stop (SIGSTOP this process: it goes on when continued, with that work in flight)
    # mid-batch: after a batch's decisions were sent, before its state and offset;
    # before-commit: the batch was processed and flushed, its commit not yet made;
    # after-commit: in the batch right after the commit that covered the offset;
    # state-write: as a batch's state is written to the local store (enospc: the disk is full);
    # fetch: as the consumer hands a fetched batch on (drop only).
    point: str
    partition: int
    offset: int
    origin: str = ""  # the configured point, when re-armed as another (after-commit)
    rewind_to: int = -1  # the configured offset, when re-armed (a rewind seeks back to it)

    @classmethod
    def from_env(cls, raw: str | None) -> Fault | None:
        """Parse the fault spec, or None when unset."""
        if not raw:
            return None
        try:
            action, point, partition, offset = raw.split(":")
            fault = cls(action, point, int(partition), int(offset))
        except ValueError:
            fault = None
        ok = (
            fault
            and fault.action in ("raise", "kill", "rewind", "enospc", "drop", "stop")
            and (
                fault.point
                in ("mid-batch", "before-commit", "after-commit", "state-write", "fetch")
            )
        )
        if ok and fault and fault.action == "rewind" and fault.point != "after-commit":
            ok = False  # only committed records can be redelivered as Faust does
        if ok and fault and (fault.action == "enospc") != (fault.point == "state-write"):
            ok = False  # a full disk fails the state write, and only that
        if ok and fault and (fault.action == "drop") != (fault.point == "fetch"):
            ok = False  # only a fetched batch can be lost on its way
        if not ok:
            raise ValueError(
                f"FLASHSALE_FAULT={raw!r}: want ACTION:POINT:PARTITION:OFFSET, ACTION"
                " raise|kill|stop|rewind|enospc|drop, POINT mid-batch|before-commit|after-commit|"
                "state-write|fetch (rewind: after-commit only; enospc: state-write only;"
                " drop: fetch only)"
            )
        return fault

    def fire(self) -> int | None:
        """Do the fault: SIGKILL or SIGSTOP this process, or raise; a rewind names the offset
        to seek to (what Faust does after a rebalance: records this worker decided come again);
        a drop returns the configured offset (the caller loses the batch holding it)."""
        log.warning("fault.injected", action=self.action, point=self.origin or self.point,
                    partition=self.partition, offset=self.offset)  # fmt: skip
        if self.action == "rewind":
            return self.rewind_to
        if self.action == "drop":
            return self.offset
        if self.action == "stop":
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
            return None
        if self.action == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)", "state")
        if self.action == "kill":
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at {self.point} {self.partition}:{self.offset}")


class SeekBacks:
    """Partitions sought back because a batch started past the next offset to decide.

    A batch starting past it would skip records (seen once in the fault suite: a replacement
    writer's first batch of a partition at 561, the group's committed offset 114). The batch is
    dropped and the partition sought back once; batches fetched before that seek took effect
    are dropped as stale; one fetched after it that still starts past the offset means the
    records are not there. Epochs are the consumer's count of seeks back (``seek_back``).
    """

    def __init__(self) -> None:
        self._sought: dict[TP, tuple[int, int]] = {}  # offset sought back to, epoch after

    def verdict(self, tp: TP, first: int, expected: int, epoch: int) -> str:
        """For a batch from ``first`` fetched at ``epoch`` when ``expected`` is next: "decide"
        (no gap), "seek" (seek back to ``expected``), "stale" (drop it, a seek is under way)
        or "missing" (the records between are not there)."""
        if first <= expected:
            return "decide"
        sought = self._sought.get(tp)
        if sought is None or sought[0] != expected:
            return "seek"
        return "stale" if epoch < sought[1] else "missing"

    def sought(self, tp: TP, expected: int, epoch: int) -> None:
        """``tp`` was sought back to ``expected``; fetches from ``epoch`` on began after."""
        self._sought[tp] = (expected, epoch)

    def forget(self, tp: TP) -> None:
        self._sought.pop(tp, None)


class BatchRuntime:
    """What the agent and the patched transport share: the gate, progress and crash exit."""

    def __init__(
        self,
        batch_topic: str,
        on_crash: Callable[[int | None, int | None, str], None],
        transaction_timeout_ms: int = 60_000,
    ) -> None:
        self.batch_topic = batch_topic
        self.transaction_timeout_ms = transaction_timeout_ms
        self.gate = asyncio.Lock()
        self.processed: dict[TP, int] = {}  # next offset to commit, per batch-topic partition
        self.abandoned = False
        self.fault = Fault.from_env(os.environ.get("FLASHSALE_FAULT"))
        self._on_crash = on_crash
        self.committed: dict[TP, int] = {}
        self.last_commit = time.monotonic()
        self.before_commit: Callable[[], Awaitable[None]] = _nothing
        self.inflight: list[Any] = []  # send futures of the open transactions
        self.work = asyncio.Event()  # set when a batch was processed: the committer wakes
        # The broker's end offsets of the assigned batch partitions (set by the app).
        self.end_offsets: Callable[[], dict[TP, int]] = dict
        self.group_committed: Callable[[TP], int | None] = lambda tp: None
        self._progress: dict[TP, tuple[int, float]] = {}
        # Counters logged every PROGRESS_EVERY_S as processor.progress (an operator's pulse).
        self.stats = {"batches": 0, "records": 0, "commits": 0, "commit_s": 0.0,
                      "gate_wait_s": 0.0, "fetch_lag_s_max": 0.0, "idle_s": 0.0,
                      "decide_s": 0.0, "emit_wait_s": 0.0}  # fmt: skip
        # Since start, never reset: the worker's /metrics (flashsale.service_metrics).
        self.totals = {"batches": 0, "records": 0, "decisions": 0, "dead_letters": 0,
                       "commits": 0, "commit_seconds": 0.0}  # fmt: skip

    async def committer(self, commit: Callable[[], Awaitable[Any]], interval: float) -> None:
        """Commit as soon as processed work waits, starting at most one commit per ``interval``.

        Faust's own commit timer sleeps the interval *after* each commit, on a loop that wakes
        late when busy: at a 100 ms interval it measured 206 ms from one commit's end to the
        next one's start (38 commits in 10 s at 5,000 intents/s), so decisions waited ~270 ms
        for their commit. Its timer stays as a slow backstop (FAUST_COMMIT_BACKSTOP_S).
        """
        began = 0.0
        while True:
            await self.work.wait()
            delay = began + interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.work.clear()  # work that arrives during this commit waits for the next one
            began = time.monotonic()
            await commit()

    def stalled_for(self) -> float:
        """Seconds since the last commit while work waits to be committed, else 0.

        Past the transaction timeout the broker has aborted our transaction (a pause, a hung
        send): nothing this process still holds can commit, so the watchdog exits it.
        """
        busy = self.gate.locked() or any(
            offset > self.committed.get(tp, -1) for tp, offset in self.processed.items()
        )
        return time.monotonic() - self.last_commit if busy else 0.0

    async def watchdog(self) -> None:
        """Exit when no commit succeeded for a transaction timeout while work was pending."""
        limit = self.transaction_timeout_ms / 1000
        next_report = time.monotonic() + PROGRESS_EVERY_S
        next_input_check = time.monotonic() + INPUT_CHECK_EVERY_S
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            if time.monotonic() >= next_report:
                next_report += PROGRESS_EVERY_S
                st = dict(self.stats)
                self.stats.update(dict.fromkeys(self.stats, 0))
                n = st["commits"] or 1
                log.info("processor.progress", batches=st["batches"], records=st["records"],
                         commits=st["commits"], commit_ms=round(st["commit_s"] / n * 1000, 1),
                         gate_wait_ms=round(st["gate_wait_s"] / n * 1000, 1),
                         fetch_lag_ms_max=round(st["fetch_lag_s_max"] * 1000, 1),
                         agent_idle_s=round(st["idle_s"], 2),
                         agent_decide_s=round(st["decide_s"], 2),
                         agent_wait_for_commit_s=round(st["emit_wait_s"], 2))  # fmt: skip
            stalled = self.stalled_for()
            if stalled > limit:
                self.crash(f"stalled: no commit for {stalled:.1f} s with work pending "
                           f"(transaction timeout {limit:g} s)")  # fmt: skip
            if not stalled:
                self.last_commit = time.monotonic()
            if time.monotonic() >= next_input_check:
                next_input_check = time.monotonic() + INPUT_CHECK_EVERY_S
                await self._check_input_flows(limit)

    async def _check_input_flows(self, limit: float) -> None:
        """Exit when an assigned partition has records waiting and made no progress for long.

        Seen once: after a restart Faust left one partition assigned but never fetched (its
        stream was not resumed after recovery); the worker sat idle with a record waiting.
        """
        ends = await asyncio.to_thread(self.end_offsets)
        now = time.monotonic()
        for tp, end in ends.items():
            known = (self.processed.get(tp), self.committed.get(tp), self.group_committed(tp))
            done = max((o for o in known if o is not None), default=0)
            seen = self._progress.get(tp)
            if seen is None or seen[0] != done or end <= done:
                self._progress[tp] = (done, now)
            elif now - seen[1] > limit:
                self.crash(f"input waiting at {done} (end {end}) with no progress for "
                           f"{now - seen[1]:.0f} s", tp.partition, done)  # fmt: skip

    def crash(self, reason: str, partition: int | None = None, offset: int | None = None) -> None:
        """Log, record the crash for the supervisor, and exit now without committing."""
        try:
            log.error("processor.crashed", partition=partition, offset=offset, reason=reason)
            self._on_crash(partition, offset, reason)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(CRASH_EXIT)

    def maybe_fault(self, point: str, partition: int, first: int, last: int) -> int | None:
        """Fire the configured fault if it targets this point and offset range; the offset to
        seek the partition back to when it is a rewind."""
        f = self.fault
        hit = f is not None and (f.point, f.partition) == (point, partition)
        if f is not None and hit and first <= f.offset <= last:
            self.fault = None
            return f.fire()
        return None

    def lost_in_fetch(self, tp: TP, first: int, last: int) -> bool:
        """Tests: whether a drop fault loses this fetched batch before it reaches the agent."""
        if self.fault is None:
            return False
        return self.maybe_fault("fetch", tp.partition, first, last) is not None

    def after_commit(self, offsets: Any) -> None:
        """Re-arm an after-commit fault to fire in the first batch after this commit."""
        f = self.fault
        if f is None or f.point != "after-commit":
            return
        for tp, offset in offsets.items():
            if tp.topic == self.batch_topic and tp.partition == f.partition and offset > f.offset:
                self.fault = Fault(f.action, "mid-batch", f.partition, offset, f.point, f.offset)


async def _nothing() -> None:
    return None
