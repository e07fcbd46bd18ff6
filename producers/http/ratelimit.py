"""Per-user token buckets, kept in the app server's memory.

Why in memory and not in Redis or Postgres: nginx routes every user to one app server
(``hash $jwt_sub consistent`` on the token's ``sub``), so each user's bucket lives in exactly
one process and checking it costs no network round trip. The caveat is failover: when a
server dies (or one is added), the users it served move to another server and start there
with a fresh, full bucket; for a few seconds such a user can get up to one extra burst.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    """One token bucket per user: ``rate`` tokens per second up to ``burst``, one request
    takes one token; idle full buckets are dropped to bound memory.

    A bucket is a plain ``(tokens, updated)`` tuple, replaced on each request: tuples of
    numbers are not tracked by the cyclic GC, so a million users' buckets add nothing to its
    full collections (objects would: each pause walks every one of them)."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._next_sweep = clock() + 60.0

    def check(self, user_id: str) -> int:
        """0 when the request may pass, else Retry-After in whole seconds (>= 1)."""
        now = self._clock()
        tokens, updated = self._buckets.get(user_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        if tokens >= 1.0:
            self._buckets[user_id] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[user_id] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if now >= self._next_sweep:
            self._sweep(now)
        return 0 if wait == 0.0 else max(1, math.ceil(wait))

    def _sweep(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {u: b for u, b in self._buckets.items() if now - b[1] < refill}
        self._next_sweep = now + 60.0

    def __len__(self) -> int:
        return len(self._buckets)
