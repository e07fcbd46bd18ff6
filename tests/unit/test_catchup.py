"""The edge's read-your-writes check (``producers.http.catchup``) without a broker: which
query a caller's answer comes from, and waiting on the feed's applied batches."""

from __future__ import annotations

import asyncio
import threading

import pytest

from producers.http.catchup import CommittedEnds, EndsUnknown, caught_up


class SlowEnds(CommittedEnds):
    """Each query returns the next number (as every partition's end), when released."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1", "t")
        self.queries = 0
        self.release = threading.Semaphore(0)

    def _ends(self) -> list[int]:
        self.queries += 1
        n = self.queries
        assert self.release.acquire(timeout=5)
        if n == 3:
            raise EndsUnknown("broker away")
        return [n]


def test_a_caller_gets_a_query_begun_after_it_asked_and_one_query_serves_many() -> None:
    async def scenario() -> None:
        ends = SlowEnds()
        first = asyncio.create_task(ends.now())
        await asyncio.sleep(0.05)  # query 1 is out
        later = [asyncio.create_task(ends.now()) for _ in range(3)]  # all wait for query 2
        await asyncio.sleep(0.05)
        assert ends.queries == 1
        ends.release.release()
        assert await first == [1]
        await asyncio.sleep(0.05)
        ends.release.release()
        assert [await t for t in later] == [[2]] * 3
        assert ends.queries == 2
        failing = asyncio.create_task(ends.now())
        await asyncio.sleep(0.05)
        ends.release.release()
        with pytest.raises(EndsUnknown):  # a failed query fails its callers
            await failing
        await ends.close()
        with pytest.raises(EndsUnknown):  # a closed one refuses
            await ends.now()

    asyncio.run(scenario())


class FakeFeed:
    def __init__(self) -> None:
        self.read = [0]
        self.waiting: asyncio.Future[None] | None = None

    def read_to(self, ends: list[int]) -> bool:
        return self.read[0] >= ends[0]

    def next_apply(self) -> asyncio.Future[None]:
        if self.waiting is None:
            self.waiting = asyncio.get_running_loop().create_future()
        return self.waiting

    def apply(self, offset: int) -> None:
        self.read = [offset]
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.set_result(None)


class FixedEnds(CommittedEnds):
    def __init__(self, end: int) -> None:
        super().__init__("127.0.0.1:1", "t")
        self.end = end

    def _ends(self) -> list[int]:
        return [self.end]


def test_waiters_wake_when_the_feed_applies_and_give_up_at_the_timeout() -> None:
    async def scenario() -> None:
        feed, ends = FakeFeed(), FixedEnds(10)
        waiters = [asyncio.create_task(caught_up(feed, ends, 5)) for _ in range(50)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        feed.apply(5)  # not far enough yet
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        feed.apply(10)
        assert all(await asyncio.gather(*waiters))
        stuck = FakeFeed()
        assert not await caught_up(stuck, ends, 0.2)  # a feed that never reads that far
        await ends.close()

    asyncio.run(scenario())
