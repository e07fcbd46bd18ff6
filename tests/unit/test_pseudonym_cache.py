"""The edge's pseudonym resolver over a fake pool (PostgreSQL itself is exercised in
tests/integration/test_pseudonyms.py): misses of a moment go as one batch, hits ask nothing,
and while PostgreSQL is away a recent pseudonym is kept, asked for again only every RETRY_S,
and given up after STALE_S."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from flashsale.pseudonyms import RETRY_S, STALE_S, Pseudonyms, pseudonym


class FakePool:
    """``user_keys`` as a dict; counts statements; ``down`` makes every one fail."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.statements = 0
        self.down = False

    @asynccontextmanager
    async def connection(self) -> Any:
        yield self

    async def execute(self, _sql: str, params: dict[str, Any]) -> Any:
        self.statements += 1
        await asyncio.sleep(0.001)  # a round trip: requests arriving meanwhile queue
        if self.down:
            raise psycopg.OperationalError("connection refused")
        for user, key in zip(params["users"], params["keys"], strict=True):
            self.keys.setdefault(user, key)
        rows = [(u, self.keys[u]) for u in params["users"]]

        class Cursor:
            async def fetchall(self) -> list[tuple[str, bytes]]:
                return rows

        return Cursor()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver() -> tuple[Pseudonyms, FakePool, Clock]:
    pool, clock = FakePool(), Clock()
    return Pseudonyms(pool, "ns", cache_s=60, clock=clock), pool, clock


def test_the_misses_of_a_moment_are_one_statement_and_hits_ask_nothing():
    names, pool, _ = resolver()

    async def go() -> list[str]:
        return await asyncio.gather(*(names.of(f"u{i % 300}") for i in range(900)))

    got = asyncio.run(go())
    assert pool.statements == 1  # 300 users, asked for three times each, one batch
    assert got[:300] == got[300:600] == [pseudonym(pool.keys[f"u{i}"], f"u{i}") for i in range(300)]
    asyncio.run(go())
    assert pool.statements == 1


def test_misses_arriving_during_a_round_trip_go_in_the_next_batch():
    names, pool, _ = resolver()

    async def go() -> None:
        first = asyncio.ensure_future(names.of("a"))
        await asyncio.sleep(0.0005)  # the first batch is in flight
        await asyncio.gather(first, *(names.of(f"b{i}") for i in range(50)))

    asyncio.run(go())
    assert pool.statements == 2


def test_while_postgres_is_away_a_recent_pseudonym_is_kept_then_given_up():
    names, pool, clock = resolver()
    before = asyncio.run(names.of("alice"))
    pool.down = True
    clock.now += 61  # past the cache: asked for again, and PostgreSQL fails
    assert asyncio.run(names.of("alice")) == before
    asked = pool.statements
    clock.now += RETRY_S / 2
    assert asyncio.run(names.of("alice")) == before and pool.statements == asked  # not again
    clock.now += RETRY_S
    assert asyncio.run(names.of("alice")) == before and pool.statements == asked + 1
    with pytest.raises(psycopg.OperationalError):  # never seen: nothing to keep (a 503)
        asyncio.run(names.of("bob"))
    clock.now = 1000.0 + STALE_S + 1  # too old to use any longer
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(names.of("alice"))
    pool.down = False
    assert asyncio.run(names.of("alice")) == before  # the key itself was never lost


def test_stale_pseudonyms_are_swept_from_memory():
    names, _, clock = resolver()
    asyncio.run(names.of("erased"))
    clock.now += STALE_S + 1
    asyncio.run(names.of("someone else"))  # a batch sweeps
    assert "erased" not in names._cache and "someone else" in names._cache
