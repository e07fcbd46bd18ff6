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
within that time. While PostgreSQL is unreachable, a cached pseudonym is still used (its
user keeps buying); a user whose key cannot be read or made is answered 503.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import psycopg

from flashsale.settings import Settings

PREFIX = "p-"
PATTERN = re.compile(r"^p-[0-9a-f]{32}$")
KEY_BYTES = 32
CACHE_S = 60.0

_MAKE = """
WITH made AS (
    INSERT INTO user_keys (namespace, user_id, key) VALUES (%(ns)s, %(user)s, %(key)s)
    ON CONFLICT (namespace, user_id) DO NOTHING RETURNING key
)
SELECT key FROM made UNION ALL
SELECT key FROM user_keys WHERE namespace = %(ns)s AND user_id = %(user)s
"""


def pseudonym(key: bytes, user_id: str) -> str:
    """The pseudonym of ``user_id`` under their ``key``."""
    return PREFIX + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:32]


def is_pseudonym(user_id: str) -> bool:
    return PATTERN.match(user_id) is not None


def _key_of(conn: psycopg.Connection[Any], namespace: str, user_id: str) -> bytes:
    """The user's key, made now if they have none. A row inserted by another server between
    this statement's snapshot and its insert is seen by the next attempt."""
    for _ in range(3):
        row = conn.execute(
            _MAKE, {"ns": namespace, "user": user_id, "key": os.urandom(KEY_BYTES)}
        ).fetchone()
        if row is not None:
            return bytes(row[0])
    raise RuntimeError(f"no key could be made for a user of namespace {namespace}")


class KeyStore:
    """``user_keys`` of one namespace, for tools, the demo and the tests (synchronous)."""

    def __init__(self, dsn: str, namespace: str) -> None:
        self.dsn = dsn
        self.namespace = namespace

    def pseudonyms(self, users: Iterable[str]) -> dict[str, str]:
        """Each user's pseudonym (keys made for those who have none)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return {u: pseudonym(_key_of(conn, self.namespace, u), u) for u in set(users)}

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
    """The edge's resolver over its async pool: ~0.2 µs a cached user, one query otherwise
    (one at a time per user: concurrent first requests share it)."""

    def __init__(self, pool: Any, namespace: str, cache_s: float = CACHE_S,
                 capacity: int = 200_000) -> None:  # fmt: skip
        self.pool = pool
        self.namespace = namespace
        self.cache_s = cache_s
        self.capacity = capacity
        self._cache: dict[str, tuple[str, float]] = {}  # user -> (pseudonym, cached at)
        self._pending: dict[str, asyncio.Future[str]] = {}

    async def of(self, user_id: str) -> str:
        hit = self._cache.get(user_id)
        if hit is not None and time.monotonic() - hit[1] < self.cache_s:
            return hit[0]
        pending = self._pending.get(user_id)
        if pending is None:
            pending = asyncio.ensure_future(self._load(user_id, hit))
            self._pending[user_id] = pending
            pending.add_done_callback(lambda _: self._pending.pop(user_id, None))
        return await asyncio.shield(pending)

    async def _load(self, user_id: str, stale: tuple[str, float] | None) -> str:
        try:
            async with self.pool.connection() as conn:
                key = None
                for _ in range(3):
                    cur = await conn.execute(_MAKE, {"ns": self.namespace, "user": user_id,
                                                     "key": os.urandom(KEY_BYTES)})  # fmt: skip
                    row = await cur.fetchone()
                    if row is not None:
                        key = bytes(row[0])
                        break
                if key is None:
                    raise RuntimeError("no key could be made for a user")
        except Exception:
            if stale is not None:  # PostgreSQL away: the user keeps their pseudonym
                return stale[0]
            raise
        alias = pseudonym(key, user_id)
        if len(self._cache) >= self.capacity:
            self._cache.clear()
        self._cache[user_id] = (alias, time.monotonic())
        return alias


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
