"""Read-your-writes at the edge: has this server's feed read every fact committed before now?

An app server that has not read a sale's ``SaleOpened`` cannot tell "no such sale" from "opened
a moment ago, not read here yet" (its feed, or the projection, may lag the log by seconds under
load). Before it answers ``404 unknown_sale`` it asks the broker for the decisions topic's
committed ends (read_committed: the last stable offsets) and waits until its feed has read up
to them; only then is "unknown" certain. One query serves every caller that arrived before it
began, so a burst of unknown-sale requests costs one broker round trip per round, not one each.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Protocol

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

log = structlog.get_logger(__name__)

POLL_S = 0.01
CATCH_UP_S = 2.0  # how long an app server waits for its feed before it is sure of a 404


class Feed(Protocol):
    def read_to(self, ends: list[int]) -> bool: ...


class CommittedEnds:
    """The decisions topic's committed end offsets, queried after the caller asked."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 5.0) -> None:
        self.topic = topic
        self.timeout_s = timeout_s
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": f"flashsale-edge-ends-{uuid.uuid4().hex}",  # never joined
            "isolation.level": "read_committed",  # the ends are the last stable offsets
            "log_level": 3,
        }
        self._consumer: Consumer | None = None
        self._lock = asyncio.Lock()  # one query at a time, on a consumer made at first use
        self._round: asyncio.Future[list[int]] | None = None  # the next query's callers
        self._tasks: set[asyncio.Task[None]] = set()

    async def now(self) -> list[int]:
        """Per partition, the committed end as of a query that began after this call."""
        if self._round is None:
            self._round = asyncio.get_running_loop().create_future()
            self._round.add_done_callback(_retrieved)
            task = asyncio.create_task(self._query())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(self._round)

    async def _query(self) -> None:
        async with self._lock:  # a round that began earlier may still be out: wait for it
            round_, self._round = self._round, None  # later callers get the round after
            assert round_ is not None
            try:
                round_.set_result(await asyncio.to_thread(self._ends))
            except Exception as exc:  # the broker away: the callers are told
                round_.set_exception(exc)

    def _ends(self) -> list[int]:
        if self._consumer is None:
            self._consumer = Consumer(self._config)
        meta = self._consumer.list_topics(self.topic, timeout=self.timeout_s)
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise KafkaException(f"topic {self.topic} is missing")
        return [
            self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), self.timeout_s, cached=False
            )[1]
            for p in sorted(topic.partitions)
        ]

    async def close(self) -> None:
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
                await asyncio.sleep(POLL_S)
        return True
    except (TimeoutError, KafkaException) as exc:
        log.warning("feed.not_caught_up", timeout_s=timeout_s, error=repr(exc))
        return False


def _retrieved(fut: asyncio.Future[list[int]]) -> None:
    """Mark a round's exception retrieved: its callers may all have timed out already."""
    if not fut.cancelled():
        fut.exception()
