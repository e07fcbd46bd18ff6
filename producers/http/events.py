"""Outcome notifications: one LISTEN connection per app server, fanned out per user.

The projector NOTIFYs ``intent_outcomes`` with ``<user_id>:<intent_id>`` lines, one per
outcome it newly projects and up to ~170 per notification. This process listens on one
connection and pushes the outcome's status to the queues of that user's subscribers (SSE
streams) held by this process. Notifications that arrive while the connection is down are
lost: a client that reconnects reads GET /v1/intents/{id} for what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import structlog

log = structlog.get_logger(__name__)

CHANNEL = "intent_outcomes"
QUEUE_MAX = 1000

Lookup = Callable[[str], Awaitable[dict[str, Any] | None]]


class OutcomeFeed:
    """Fan-out of outcome notifications to in-process subscribers by user id."""

    def __init__(self, dsn: str, lookup: Lookup, reconnect_s: float = 1.0) -> None:
        self._dsn = dsn
        self._lookup = lookup
        self._reconnect_s = reconnect_s
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    def start(self) -> None:
        """Start listening in the background (call from the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outcome-feed")

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def subscribe(self, user_id: str) -> asyncio.Queue[dict[str, Any]]:
        """A queue receiving the statuses of user_id's newly decided intents."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_MAX)
        self._subscribers[user_id].add(queue)
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Forget a subscriber."""
        subs = self._subscribers.get(user_id)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del self._subscribers[user_id]

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    async def _run(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    log.info("feed.listening", channel=CHANNEL)
                    async for note in conn.notifies():
                        await self._deliver(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection dropped: reconnect
                log.warning("feed.disconnected", error=str(exc))
            self.listening.clear()
            await asyncio.sleep(self._reconnect_s)

    async def _deliver(self, payload: str) -> None:
        for line in payload.split("\n"):
            user_id, _, intent_id = line.rpartition(":")
            subs = self._subscribers.get(user_id)
            if not subs:
                continue
            status = await self._lookup(intent_id)
            if status is None:
                continue
            for queue in list(subs):
                with contextlib.suppress(asyncio.QueueFull):  # a stalled client misses events
                    queue.put_nowait(status)
