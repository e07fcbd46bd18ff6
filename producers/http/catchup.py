"""Read-your-writes at the edge: has this server's feed read every fact committed before now?

An app server that has not read a sale's ``SaleOpened`` cannot tell "no such sale" from "opened
a moment ago, not read here yet" (its feed, or the projection, may lag the log by seconds under
load). Before it answers ``404 unknown_sale`` it asks the broker for the decisions topic's
committed ends (read_committed: the last stable offsets) and waits until its feed has read up
to them; only then is "unknown" certain. One query serves every caller that arrived before it
began, so a burst of unknown-sale requests costs one broker round trip per round, not one
each, and the waiters wake once per batch the feed applies, not on a timer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Protocol

import structlog
from confluent_kafka import KafkaException, TopicPartition

from flashsale.kafka_auth import Consumer

log = structlog.get_logger(__name__)


class Feed(Protocol):
    def read_to(self, ends: list[int]) -> bool: ...

    def next_apply(self) -> asyncio.Future[None]: ...


class EndsUnknown(Exception):
    """The committed ends could not be had (the broker away or slow, the server stopping)."""


class CommittedEnds:
    """The decisions topic's committed end offsets, queried after the caller asked."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 5.0) -> None:
        self.topic = topic
        self.timeout_s = timeout_s  # for a whole query
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}.edge-ends-{uuid.uuid4().hex}",  # never joined
            "isolation.level": "read_committed",  # the ends are the last stable offsets
            "log_level": 3,
        }
        self._consumer: Consumer | None = None  # made at the first query, used by one at a time
        self._partitions: list[int] = []
        self._lock = asyncio.Lock()
        self._round: asyncio.Future[list[int]] | None = None  # the next query's callers
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def now(self) -> list[int]:
        """Per partition, the committed end as of a query that began after this call."""
        if self._closed:
            raise EndsUnknown("the server is stopping")
        round_ = self._round
        if round_ is None:
            round_ = self._round = asyncio.get_running_loop().create_future()
            round_.add_done_callback(_retrieved)
            task = asyncio.create_task(self._query(round_))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(round_)

    async def _query(self, round_: asyncio.Future[list[int]]) -> None:
        try:
            async with self._lock:  # a round that began earlier may still be out: wait for it
                if self._round is round_:
                    self._round = None  # callers from now on get the round after this one
                ends = await asyncio.to_thread(self._ends)
            round_.set_result(ends)
        except Exception as exc:
            log.warning("feed.ends_unknown", topic=self.topic, error=repr(exc))
            round_.set_exception(EndsUnknown(repr(exc)))
        finally:
            if self._round is round_:  # cancelled before it began: the next caller starts one
                self._round = None
            if not round_.done():
                round_.set_exception(EndsUnknown("cancelled"))

    def _ends(self) -> list[int]:
        if self._closed:
            raise EndsUnknown("the server is stopping")
        if self._consumer is None:
            self._consumer = Consumer(self._config)
        try:
            self._partitions, marks = watermarks(
                self._consumer, self.topic, self._partitions or None, self.timeout_s
            )
        except LookupError as missing:
            raise EndsUnknown(str(missing)) from None
        return [high for _, high in marks]

    async def close(self) -> None:
        """Refuse new queries, let the one out finish (bounded by ``timeout_s``), close."""
        self._closed = True
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        async with self._lock:
            if self._consumer is not None:
                await asyncio.to_thread(self._consumer.close)
                self._consumer = None


async def caught_up(feed: Feed, ends: CommittedEnds, timeout_s: float) -> bool:
    """True once ``feed`` has read every fact committed before this call; False when that
    did not happen within ``timeout_s`` (the broker or the feed slow or away: not certain)."""
    try:
        async with asyncio.timeout(timeout_s):
            target = await ends.now()
            while not feed.read_to(target):
                await asyncio.shield(feed.next_apply())  # shared by every waiter
        return True
    except (TimeoutError, EndsUnknown, KafkaException):
        return False


def _retrieved(fut: asyncio.Future[list[int]]) -> None:
    """Mark a round's exception retrieved: its callers may all have timed out already."""
    if not fut.cancelled():
        fut.exception()


def watermarks(
    consumer: Consumer, topic: str, partitions: list[int] | None, timeout_s: float
) -> tuple[list[int], list[tuple[int, int]]]:
    """The topic's partitions (listed when None) and each one's (low, high) watermarks, asked
    of the broker (under read_committed the high one is the last stable offset); the whole
    call is bounded by ``timeout_s``. LookupError when the topic is missing."""
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return max(0.05, deadline - time.monotonic())

    if partitions is None:
        meta = consumer.list_topics(topic, timeout=left())
        found = meta.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise LookupError(f"topic {topic} is missing")
        partitions = sorted(found.partitions)
    marks = [
        consumer.get_watermark_offsets(TopicPartition(topic, p), left(), cached=False)
        for p in partitions
    ]
    return partitions, marks
