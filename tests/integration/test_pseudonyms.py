"""Per-user keys in PostgreSQL: two app servers making the keys of the same new users at
once (batched, in opposite orders) agree on every pseudonym, and so do the tools; erasure
deletes the key and the next lookup makes another."""

from __future__ import annotations

import asyncio

from psycopg_pool import AsyncConnectionPool

from flashsale.pseudonyms import KeyStore, Pseudonyms, is_pseudonym
from infra.stack import Endpoints


def test_two_servers_racing_on_new_users_agree_and_erasure_makes_a_new_key(
    endpoints: Endpoints, uid: str
) -> None:
    ns = f"pseudo-{uid}"
    users = [f"user-{i}@example.com" for i in range(2000)]

    async def race() -> tuple[list[str], list[str]]:
        async with (
            AsyncConnectionPool(endpoints.dsn, min_size=2, max_size=4) as one,
            AsyncConnectionPool(endpoints.dsn, min_size=2, max_size=4) as two,
        ):
            a, b = Pseudonyms(one, ns), Pseudonyms(two, ns)
            return await asyncio.gather(
                asyncio.gather(*(a.of(u) for u in users)),
                asyncio.gather(*(b.of(u) for u in reversed(users))),
            )

    first, second = asyncio.run(race())
    assert first == list(reversed(second)), "two app servers gave a user two pseudonyms"
    assert len(set(first)) == len(users) and all(is_pseudonym(p) for p in first)
    keys = KeyStore(endpoints.dsn, ns)
    assert keys.pseudonyms(users) == dict(zip(users, first, strict=True))
    assert keys.known(users[0]) == first[0]
    assert keys.erase(users[0]) and keys.known(users[0]) is None and not keys.erase(users[0])
    again = keys.pseudonyms([users[0]])[users[0]]
    assert again != first[0] and keys.known(users[0]) == again
    assert KeyStore(endpoints.dsn, f"other-{uid}").known(users[1]) is None  # per namespace
