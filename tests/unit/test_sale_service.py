"""Opening a sale: claimed once, answered from every SKU's fact, a partial open reported."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from producers.commands import SkuAllocation
from producers.http.feedfacts import Fact
from producers.http.livefeed import DecisionFeed
from producers.http.rules import Refused
from producers.sales import SaleService
from schemas.codec import SchemaRegistry


class FakeClaims:
    def __init__(self) -> None:
        self.rows: dict[str, str] = {}
        self.projected: dict[str, dict[str, dict[str, Any]]] = {}

    async def claim(self, sale_id: str, terms: str, by: str) -> str | None:
        if sale_id in self.rows:
            return self.rows[sale_id]
        self.rows[sale_id] = terms
        return None

    async def opened(self, sale_id: str) -> dict[str, dict[str, Any]]:
        return self.projected.get(sale_id, {})


class FakeWriters:
    """Writes OpenSale (in a thread, as the producer does); each SKU's writer answers in the
    log unless it is told to refuse or stay silent."""

    def __init__(self, feed: DecisionFeed, loop: asyncio.AbstractEventLoop) -> None:
        self.feed, self.loop = feed, loop
        self.written: list[tuple[str, str]] = []
        self.cadences: list[int | None] = []
        self.refuse: set[str] = set()
        self.silent: set[str] = set()
        self.offset = 0

    def open_sale(
        self,
        sale_id: str,
        skus: Sequence[SkuAllocation],
        starts_at_ms: int,
        ends_at_ms: int,
        *,
        prequeue_opens_at_ms: int | None = None,
        draw_commitment: str | None = None,
        progress_every: int | None = None,
        hold_ms: int | None = None,
        pay_grace_ms: int = 0,
        waitlist_depth: int = 0,
    ) -> None:
        facts = []
        record: dict[str, Any]
        for s in skus:
            self.written.append((sale_id, s.sku))
            self.cadences.append(progress_every)
            self.offset += 1
            if s.sku in self.silent:
                continue
            if s.sku in self.refuse:
                record = {"sale_id": sale_id, "sku": s.sku, "command": "OpenSale",
                          "detail": "sale already open with other terms"}  # fmt: skip
                facts.append(Fact(0, self.offset, "SaleRefused", record))
            else:
                record = {"sale_id": sale_id, "sku": s.sku, "allocation": s.allocation,
                          "per_user_limit": s.per_user_limit, "per_order_max": s.per_order_max,
                          "starts_at": starts_at_ms, "ends_at": ends_at_ms,
                          "prequeue_opens_at": prequeue_opens_at_ms,
                          "draw_commitment": draw_commitment, "hold_ms": hold_ms,
                          "pay_grace_ms": pay_grace_ms}  # fmt: skip
                facts.append(Fact(0, self.offset, "SaleOpened", record))
        self.loop.call_soon_threadsafe(self.feed.apply, facts)


def setup() -> tuple[SaleService, FakeClaims, FakeWriters]:
    feed = DecisionFeed("127.0.0.1:1", "t", SchemaRegistry.load_default())
    feed.begin_at([0])
    claims, writers = FakeClaims(), FakeWriters(feed, asyncio.get_running_loop())
    return SaleService(claims, writers, feed, wait_s=0.5), claims, writers


SKUS = [SkuAllocation("a", 10, 1, 1), SkuAllocation("b", 5, 2, 1)]


def test_a_sale_opens_once_every_sku_is_open_in_the_log_and_is_claimed_once():
    async def scenario() -> None:
        svc, claims, writers = setup()
        opening = await svc.open_sale("s", SKUS, 1000, 2000, "ops")
        assert opening.complete and sorted(opening.opened) == ["a", "b"]
        assert opening.opened["b"]["allocation"] == 5
        with pytest.raises(Refused) as refused:  # other numbers under the same id
            await svc.open_sale("s", [SkuAllocation("a", 11, 1, 1)], 1000, 2000, "ops")
        assert refused.value.code == "sale_exists"
        # The same opening again, once projected: nothing is written again.
        claims.projected["s"] = {s.sku: {"sku": s.sku} for s in SKUS}
        again = await svc.open_sale("s", SKUS, 1500, 2500, "ops")
        assert again.complete and len(writers.written) == 2

    asyncio.run(scenario())


def test_a_partial_open_is_reported_sku_by_sku():
    async def scenario() -> None:
        svc, _, writers = setup()
        writers.refuse, writers.silent = {"a"}, {"c"}
        skus = [*SKUS, SkuAllocation("c", 1, 1, 1)]
        opening = await svc.open_sale("p", skus, 1000, 2000, "ops")
        assert not opening.complete
        assert {d["sku"]: d["outcome"] for d in opening.details()} == {
            "a": "refused", "b": "opened", "c": "pending"}  # fmt: skip
        assert opening.refused["a"] == "sale already open with other terms"

    asyncio.run(scenario())


class FakeSeeds:
    """Like ``DrawSeeds``: one seed per sale; a retry's window replaces the old one."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[list[str], int, str]] = {}
        self.armed_sales: list[str] = []

    def commit(self, sale_id: str, skus: Sequence[str], reveal_at_ms: int, ends_at_ms: int) -> str:
        seed = self.kept[sale_id][2] if sale_id in self.kept else f"{len(self.kept):064x}"
        self.kept[sale_id] = (list(skus), reveal_at_ms, seed)
        return seed

    def armed(self, sale_id: str) -> None:
        self.armed_sales.append(sale_id)


def test_a_prequeue_sale_gets_one_seed_and_its_commitment_in_every_opensale() -> None:
    asyncio.run(_prequeue_scenario())


async def _prequeue_scenario() -> None:
    svc, _, writers = setup()
    svc.seeds = seeds = FakeSeeds()
    opening = await svc.open_sale("q", SKUS, 1000, 2000, "ops", prequeue_opens_at_ms=500)
    assert opening.complete
    committed = seeds.kept["q"][2]
    assert {f["draw_commitment"] for f in opening.opened.values()} == {committed}
    assert seeds.kept["q"][:2] == (["a", "b"], 1000)  # revealed at the start
    assert seeds.armed_sales == ["q"]
    writers.silent = {"b"}  # a retry of the same opening reuses the seed
    again = await svc.open_sale("q2", SKUS, 1000, 2000, "ops", prequeue_opens_at_ms=500)
    assert again.pending == ["b"] and seeds.armed_sales == ["q"]  # incomplete: never revealed
    writers.silent = set()  # the retry's window moved (relative to now): the reveal moves too
    retried = await svc.open_sale("q2", SKUS, 1500, 2500, "ops", prequeue_opens_at_ms=1000)
    assert retried.complete and len(seeds.kept) == 2 and seeds.armed_sales == ["q", "q2"]
    assert retried.opened["b"]["draw_commitment"] == seeds.kept["q2"][2]
    assert seeds.kept["q2"][1] == 1500
    with pytest.raises(Refused) as other:  # the same id without its pre-queue: other terms
        await svc.open_sale("q", SKUS, 1000, 2000, "ops")
    assert other.value.code == "sale_exists"


def test_without_a_seed_keeper_a_prequeue_is_refused_and_nothing_is_written() -> None:
    asyncio.run(_no_keeper_scenario())


async def _no_keeper_scenario() -> None:
    svc, claims, writers = setup()
    with pytest.raises(Refused) as refused:
        await svc.open_sale("q", SKUS, 1000, 2000, "ops", prequeue_opens_at_ms=500)
    assert refused.value.code == "no_prequeue"
    assert writers.written == [] and claims.rows == {}


def test_a_retry_on_a_server_with_another_cadence_writes_the_first_attempts_terms() -> None:
    async def scenario() -> None:
        svc, claims, writers = setup()
        assert svc.progress_every == 1000  # the default cadence of a sale's progress facts
        writers.silent = {"b"}  # the first attempt's b is lost (no fact: pending)
        first = await svc.open_sale("r", SKUS, 1000, 2000, "ops")
        assert first.pending == ["b"]
        writers.silent = set()
        other = SaleService(claims, writers, svc.facts, wait_s=0.5, progress_every=None)
        again = await other.open_sale("r", SKUS, 1000, 2000, "ops")
        assert again.complete and writers.cadences == [1000, 1000, 1000]

    asyncio.run(scenario())
