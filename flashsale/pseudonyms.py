"""Pseudonyms: the user ids the log carries instead of people's ids.

Topics are kept forever, so a record never names a person. The edge turns a token's ``sub``
into ``p-`` + the first 32 hex digits of HMAC-SHA256(the user's key, the user id) before
anything is written or looked up; the writer, the projections, the notifications, the draw
and the audits only ever see that pseudonym (the audits need nothing else: one chance per
person, per-user limits and every check hold on pseudonyms as they did on ids).

Each user's key is random, made on their first request, and kept only in PostgreSQL
(``user_keys``, one row per namespace and user). Erasing a user deletes the row: their
records stay in the log untouched, but nobody, us included, can tie them to the person
again. If the same person comes back later, they get a new key and a new pseudonym.

App servers cache a user's pseudonym for ``CACHE_S``: an erasure reaches every server
within that time. While PostgreSQL is unreachable, a pseudonym fetched less than ``STALE_S``
ago is still used (its user keeps buying; the key is asked for again every ``RETRY_S``); a
user whose key cannot be read or made is answered 503. Pseudonyms past ``STALE_S`` are swept
from memory.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from flashsale.settings import Settings

PREFIX = "p-"
PATTERN = re.compile(r"^p-[0-9a-f]{32}$")
KEY_BYTES = 32
CACHE_S = 60.0
STALE_S = 300.0  # PostgreSQL away: a cached pseudonym serves this long after its fetch
RETRY_S = 5.0  # ... asked for again at most this often meanwhile

MAX_BATCH = 500

# Keys for a batch of users, made for those who have none, in one statement: the new rows
# come from the INSERT, the others from the SELECT (the statement's snapshot). A row another
# server inserts meanwhile is in neither (the INSERT waits for its commit and skips it; the
# snapshot predates it): that user is asked for again. Sorted, two batches insert in one
# order and cannot deadlock.
_MAKE = """
WITH made AS (
    INSERT INTO user_keys (namespace, user_id, key)
    SELECT %(ns)s, u, k FROM unnest(%(users)s::text[], %(keys)s::bytea[]) AS t(u, k)
    ON CONFLICT (namespace, user_id) DO NOTHING RETURNING user_id, key
)
SELECT user_id, key FROM made UNION ALL
SELECT user_id, key FROM user_keys WHERE namespace = %(ns)s AND user_id = ANY(%(users)s)
"""


def _params(namespace: str, users: list[str]) -> dict[str, Any]:
    users = sorted(set(users))
    return {"ns": namespace, "users": users, "keys": [os.urandom(KEY_BYTES) for _ in users]}


def pseudonym(key: bytes, user_id: str) -> str:
    """The pseudonym of ``user_id`` under their ``key``."""
    return PREFIX + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]


def is_pseudonym(user_id: str) -> bool:
    return PATTERN.match(user_id) is not None


class KeyStore:
    """``user_keys`` of one namespace, for tools, the demo and the tests (synchronous)."""

    def __init__(self, dsn: str, namespace: str) -> None:
        self.dsn = dsn
        self.namespace = namespace

    def pseudonyms(self, users: Iterable[str]) -> dict[str, str]:
        """Each user's pseudonym (keys made for those who have none)."""
        wanted = sorted(set(users))
        found: dict[str, str] = {}
        stuck = 0
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while missing := [u for u in wanted if u not in found][:MAX_BATCH]:
                rows = conn.execute(_MAKE, _params(self.namespace, missing)).fetchall()
                stuck = 0 if rows else stuck + 1
                if stuck == 3:
                    raise psycopg.OperationalError("keys could not be made; ask again")
                found.update((u, pseudonym(bytes(k), u)) for u, k in rows)
        return found

    def known(self, user_id: str) -> str | None:
        """The user's pseudonym if they have a key; None (and nothing made) otherwise."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT key FROM user_keys WHERE namespace = %s AND user_id = %s",
                (self.namespace, user_id),
            ).fetchone()
        return pseudonym(bytes(row[0]), user_id) if row else None

    def erase(self, user_id: str) -> bool:
        """Delete the user's key; False when they had none."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            gone = conn.execute(
                "DELETE FROM user_keys WHERE namespace = %s AND user_id = %s",
                (self.namespace, user_id),
            ).rowcount
        return gone > 0


class Pseudonyms:
    """The edge's resolver over its async pool: ~0.3 µs a cached user. Users not cached are
    looked up together: the misses of one turn of the event loop (a spike of new users) go
    to PostgreSQL as one batch, two statements for up to ``MAX_BATCH`` users, instead of a
    round trip each; a user asked for twice meanwhile shares the one lookup."""

    def __init__(
        self,
        pool: Any,
        namespace: str,
        cache_s: float = CACHE_S,
        capacity: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self._clock = clock
        self.namespace = namespace
        self.cache_s = cache_s
        self.capacity = capacity
        # user -> (pseudonym, fresh until, usable while PostgreSQL is away until); monotonic
        self._cache: dict[str, tuple[str, float, float]] = {}
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._queue: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self._swept = clock()

    async def of(self, user_id: str) -> str:
        hit = self._cache.get(user_id)
        if hit is not None and self._clock() < hit[1]:
            return hit[0]
        pending = self._pending.get(user_id)
        if pending is None:
            pending = self._pending[user_id] = asyncio.get_running_loop().create_future()
            pending.add_done_callback(_retrieved)  # its waiters may all have gone
            self._queue.append(user_id)
            if self._flusher is None:
                self._flusher = asyncio.ensure_future(self._flush())
        return await asyncio.shield(pending)

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(0)  # the other requests of this turn join the batch
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    keys = await self._keys(batch)
                except BaseException as exc:  # every waiter of the batch hears of it
                    cancelled = psycopg.OperationalError("the lookup was cancelled")
                    self._failed(batch, exc if isinstance(exc, Exception) else cancelled)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                now = self._clock()
                self._sweep(now, len(batch))
                for user in batch:
                    alias = pseudonym(keys[user], user)
                    self._cache[user] = (alias, now + self.cache_s, now + STALE_S)
                    self._pending.pop(user).set_result(alias)
        finally:
            self._flusher = None
            if self._queue:  # asked for while the last batch was being answered
                self._flusher = asyncio.ensure_future(self._flush())

    async def _keys(self, batch: list[str]) -> dict[str, bytes]:
        keys: dict[str, bytes] = {}
        async with self.pool.connection() as conn:
            for _ in range(3):  # a user another server was making: asked for again
                params = _params(self.namespace, [u for u in batch if u not in keys])
                cur = await conn.execute(_MAKE, params)
                keys.update((u, bytes(k)) for u, k in await cur.fetchall())
                if len(keys) == len(set(batch)):
                    return keys
        raise psycopg.OperationalError("a user's key could not be made; ask again")

    def _failed(self, batch: list[str], exc: Exception) -> None:
        """PostgreSQL away: a user whose pseudonym was fetched less than ``STALE_S`` ago keeps
        it (asked for again in ``RETRY_S``, not on every request); the others get the error."""
        now = self._clock()
        for user in batch:
            waiter = self._pending.pop(user)
            stale = self._cache.get(user)
            if stale is not None and now < stale[2]:
                self._cache[user] = (stale[0], now + RETRY_S, stale[2])
                waiter.set_result(stale[0])
            else:
                self._cache.pop(user, None)
                waiter.set_exception(exc)

    def _sweep(self, now: float, room: int) -> None:
        """Forget pseudonyms past their stale time (an erased user's goes from memory too),
        once a minute; start again empty when full."""
        if now - self._swept >= self.cache_s:
            self._swept = now
            for user in [u for u, v in self._cache.items() if v[2] <= now]:
                del self._cache[user]
        if len(self._cache) + room > self.capacity:
            self._cache.clear()


def _retrieved(future: asyncio.Future[str]) -> None:
    if not future.cancelled():
        future.exception()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale user pseudonym --user U` and `flashsale user erase --user U`."""
    p = sub.add_parser("user", help="a user's pseudonym in the log, or erase the user")
    p.add_argument("action", choices=("pseudonym", "erase"))
    p.add_argument("--user", required=True, help="the user id (a token's sub)")
    p.set_defaults(run=run_user)


def run_user(args: argparse.Namespace, settings: Settings) -> int:
    from infra.stack import Stack

    store = KeyStore(Stack(settings).endpoints().dsn, settings.namespace)
    if args.action == "pseudonym":
        alias = store.known(args.user)
        if alias is None:
            print("no key: this user has never been seen, or was erased")
            return 1
        print(alias)
        return 0
    if not store.erase(args.user):
        print("no key: this user has never been seen, or was erased already")
        return 1
    print(
        f"erased: the key is deleted; their records stay in the log under a pseudonym nobody "
        f"can tie to them (app servers drop it within {CACHE_S:.0f} s)"
    )
    return 0
