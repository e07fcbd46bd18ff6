"""What the app server keeps per intent, user or decision is not tracked by the cyclic GC.

Each full collection walks every tracked object with the event loop stopped: tables of
objects (dataclasses, futures) made those walks 60-200 ms at 100,000-200,000 entries, the
p99 of a loaded app server. Plain tuples and dicts of numbers and strings are untracked once
a collection has seen them; these tests pin that the tables stay that way.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from producers.commands import Appended
from producers.http.auth import TokenVerifier, token
from producers.http.feedfacts import Fact
from producers.http.intake import Receipts, RecentIntents
from producers.http.livefeed import DecisionFeed
from producers.http.models import IntentStatus
from producers.http.ratelimit import RateLimiter
from producers.http.views import IntentViews
from schemas.codec import SchemaRegistry
from tests.unit.test_intake import SECRET, FakeLog, FakeSales, service, terms


def tracked(values: Any) -> list[Any]:
    for _ in range(3):  # a collection untracks a tuple once its items are: one level a pass
        gc.collect()
    return [v for v in values if gc.is_tracked(v)]


def test_settled_recent_intents_are_untracked() -> None:
    svc = service(FakeSales({"k": terms()}), FakeLog(), capacity=1000)

    async def place() -> None:
        for i in range(200):
            await svc.place_intent(f"u{i}", "s", "k", 1, f"key{i}")

    asyncio.run(place())
    entries = list(svc.recent._entries.values())
    assert len(entries) == 200 and tracked(entries) == []
    assert tracked(svc.recent._entries.keys()) == []


def test_a_pending_recent_intent_keeps_its_future_until_settled() -> None:
    async def scenario() -> None:
        recent = RecentIntents(10)
        done: asyncio.Future[Appended | None] = asyncio.get_running_loop().create_future()
        entry = ("k", 1, "i", done)
        recent.put(("u", "s", "key"), entry)
        done.set_result(Appended(1, 2, 3))
        recent.settle(("u", "s", "key"), entry, done)
        assert recent.get(("u", "s", "key")) == ("k", 1, "i", (1, 2, 3))

    asyncio.run(scenario())


def test_token_cache_and_rate_buckets_are_untracked() -> None:
    verifier, limiter = TokenVerifier(SECRET), RateLimiter(5, 10)
    for i in range(100):
        who = verifier.verify("Bearer " + token(f"u{i}", "shopper", 600, SECRET))
        limiter.check(who.user_id)
    assert tracked(verifier._cache.values()) == []
    assert tracked(limiter._buckets.values()) == []


def test_the_feed_window_and_kept_answers_are_untracked() -> None:
    now = int(time.time() * 1000)

    async def scenario() -> None:
        feed = DecisionFeed("127.0.0.1:1", "t", SchemaRegistry.load_default(), 1000)
        feed.begin_at([0], lows=[0], highs=[0])
        record = {"intent_id": "", "sale_id": "s", "sku": "k", "user_id": "u", "quantity": 1,
                  "order_id": "o", "remaining": 1, "sequence": 1, "decided_at": now}  # fmt: skip
        feed.apply([Fact(0, i, "IntentAccepted", {**record, "intent_id": f"i{i}"})
                    for i in range(300)])  # fmt: skip
        assert tracked(feed._facts[0]) == [] and tracked(feed._decided.values()) == []
        views = IntentViews(None, Receipts(SECRET), decisions=feed.decision)
        for i in range(50):
            await views.get("u", f"i{i}", None)
        assert len(views._final) == 50 and tracked(views._final.values()) == []
        status = IntentStatus.model_validate_json(
            (await views.get("u", "i7", None)).body
        )  # a kept answer still reads back
        assert status.status == "accepted"

    asyncio.run(scenario())
