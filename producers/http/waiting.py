"""Who is still waiting for the writer, and how far ahead of them it is: "n ahead of you".

Every 202 names where the log put the intent (its input partition and offset). The writer's
``QueueProgress`` facts say how far through each input partition it has decided (the offset
of the command behind its latest progress fact) and whether the allocation is gone. So for an
intent not decided yet:

- ``ahead``: input records between the writer's latest progress fact of the partition and
  the intent. The writer decides them all first, in log order. It is an upper bound: other
  SKUs of the partition and clock ticks count too, and the writer may have moved on since
  its latest progress fact (up to ``progress_every`` events of that sale, more when sales
  opened without a cadence share the partition).
- ``eta_s``: ``ahead`` divided by the rate at which the writer moved through that partition
  over the last ``RATE_WINDOW_S`` seconds, timed by when the writer wrote its progress facts
  (their Kafka timestamps, not when this server read them: a server catching up reads old
  facts in a burst). It is an estimate of the writer's backlog at its recent pace, not a
  promise or a slot: the queue is not throttled (the writer decides as fast as it can), so it
  moves with the writer's pace; none while no progress fact was written in the window.
- ``sold_out``: the allocation is gone as of the log. The intent is then rejected when the
  writer reaches it, unless units come back.

An intent's owner is pushed this status on their stream when a progress fact of its
(sale, SKU) arrives, at most once a ``push_every_s`` per (sale, SKU), and at once when the
allocation is gone: then every intent still waiting that this server acknowledged is told
together (nginx keeps a user's requests and streams on one server).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

WAITING = "Waiting"
"""The name of a pushed status that is not a log fact (the owner's intent, still waiting)."""
RATE_WINDOW_S = 10.0
SAMPLE_S = 0.1

# intent id -> (user id, sale id, SKU, quantity, input partition, input offset)
_Pending = tuple[str, str, str, int, int, int]


class WaitingRoom:
    """Intents this server answered 202 whose decision it has not read yet."""

    def __init__(self, capacity: int = 200_000, push_every_s: float = 1.0) -> None:
        self.capacity = capacity
        self.push_every_s = push_every_s
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._by_sku: dict[tuple[str, str], set[str]] = {}
        self._pushed: dict[tuple[str, str], float] = {}  # (sale, SKU) -> its last pushes
        # Per input partition: (written at, offset) of the writer's progress facts, at most
        # one per SAMPLE_S, oldest first; and the rate measured over them at the latest one.
        self._at: dict[int, deque[tuple[float, int]]] = {}
        self._rate: dict[int, float | None] = {}
        self._gone: dict[tuple[str, str], bool] = {}  # (sale, SKU) -> allocation gone

    def __len__(self) -> int:
        return len(self._pending)

    def register(
        self,
        user_id: str,
        intent_id: str,
        sale_id: str,
        sku: str,
        quantity: int,
        partition: int,
        offset: int,
    ) -> None:
        """An intent the log acknowledged at (``partition``, ``offset``) just now."""
        if intent_id in self._pending:
            return
        self._pending[intent_id] = (user_id, sale_id, sku, quantity, partition, offset)
        self._by_sku.setdefault((sale_id, sku), set()).add(intent_id)
        if len(self._pending) > self.capacity:
            self.resolved(next(iter(self._pending)))

    def resolved(self, intent_id: str) -> None:
        """Its decision (or its place in a pre-queue) is known: no longer waiting."""
        pending = self._pending.pop(intent_id, None)
        if pending is None:
            return
        key = (pending[1], pending[2])
        waiting = self._by_sku.get(key)
        if waiting is not None:
            waiting.discard(intent_id)
            if not waiting:
                del self._by_sku[key]

    def returned(self, sale_id: str, sku: str) -> None:
        """Units came back: the allocation is not gone (until a progress fact says so)."""
        self._gone.pop((sale_id, sku), None)

    def status(
        self, sale_id: str, sku: str, partition: int | None, offset: int | None
    ) -> dict[str, Any]:
        """``ahead``, ``eta_s`` and ``sold_out`` for an intent at (partition, offset); None
        where not known (no progress fact of that partition read yet, no recent rate)."""
        out: dict[str, Any] = {"ahead": None, "eta_s": None,
                               "sold_out": self._gone.get((sale_id, sku), False)}  # fmt: skip
        samples = self._at.get(partition) if partition is not None else None
        if not samples or offset is None:
            return out
        out["ahead"] = ahead = max(0, offset - samples[-1][1] - 1)
        rate = self._rate.get(partition) if partition is not None else None
        if rate and time.time() - samples[-1][0] <= RATE_WINDOW_S:  # a writer heard lately
            out["eta_s"] = round(ahead / rate, 1)
        return out

    def progress(self, record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Apply a ``QueueProgress`` (``written_at``: the record's Kafka timestamp, ms, when
        known); the (owner, status) pushes it makes due."""
        partition, reached = record["input_partition"], record["input_offset"]
        at = record.get("written_at", time.time() * 1000) / 1000
        samples = self._at.setdefault(partition, deque())
        if len(samples) > 1 and at - samples[-2][0] < SAMPLE_S:
            samples[-1] = (at, reached)  # at most one sample per SAMPLE_S
        else:
            samples.append((at, reached))
        while len(samples) > 2 and at - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()
        self._rate[partition] = _rate(samples)
        key = (record["sale_id"], record["sku"])
        gone = record["remaining"] <= 0
        told = record["sold_out"] or (gone and not self._gone.get(key))
        self._gone[key] = gone
        if len(self._gone) > 100_000:
            self._gone.clear()
        waiting = self._by_sku.get(key)
        now = time.monotonic()
        if not waiting or (not told and now - self._pushed.get(key, -1e9) < self.push_every_s):
            return []
        self._pushed[key] = now
        if len(self._pushed) > 100_000:
            self._pushed.clear()
        pushes = []
        for intent_id in list(waiting):
            user_id, sale_id, sku, quantity, p, offset = self._pending[intent_id]
            if p == partition and offset <= reached:
                # The writer decided it before this fact (a repeat it ignored, or a decision
                # read before this server registered it): it waits no more.
                self.resolved(intent_id)
                continue
            status = {"intent_id": intent_id, "sale_id": sale_id, "sku": sku,
                      "quantity": quantity, "status": "queued",
                      **self.status(sale_id, sku, p, offset)}  # fmt: skip
            pushes.append((user_id, status))
        return pushes


def _rate(samples: deque[tuple[float, int]]) -> float | None:
    """Input records per second between the first and the last sample (None: unknown)."""
    if len(samples) < 2:
        return None
    (t0, o0), (t1, o1) = samples[0], samples[-1]
    return (o1 - o0) / (t1 - t0) if t1 > t0 and o1 > o0 else None
