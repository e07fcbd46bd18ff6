"""Opening a sale: the one service behind ``POST /v1/admin/sales`` and ``flashsale sale open``.

1. **Claim the sale id** with a unique row in PostgreSQL (``sale_claims``; the admin path is
   not hot). Another opening of the same id gets ``sale_exists``; the same opening again (a
   retry after an unknown outcome) goes on.
2. **Write one OpenSale per SKU** (acks=all). Each SKU has its own writer, so the sale is
   open only once every SKU's writer said so in the log.
3. **Wait for the facts**: the decisions topic carries a ``SaleOpened`` (with the terms in
   force) or a ``SaleRefused`` (with the reason) per SKU. The answer reports every SKU: all
   opened, or which were refused and which did not answer in time (a partial open is
   reported, never hidden).

A sale with a pre-queue (``prequeue_opens_at_ms``) gets a secret draw seed, kept by
``producers.clock.DrawSeeds`` until the sale clock reveals it at the start; only its
commitment (SHA-256) goes into the OpenSale commands.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from flashsale.settings import env_int
from producers.commands import SkuAllocation
from producers.http.rules import Refused


class FactSource(Protocol):
    """The decisions topic as read by this process (``producers.http.livefeed``)."""

    def expect(
        self, sale_id: str, sku: str, accept: Callable[[Any], bool]
    ) -> asyncio.Future[Any]: ...

    def forget(self, sale_id: str, sku: str, fut: asyncio.Future[Any]) -> None: ...

    def knows(self, sale_id: str, sku: str) -> bool:
        """Whether a fact of (sale, SKU) was read (an opened SKU, maybe not projected yet)."""
        ...


PROGRESS_EVERY = 1000
"""Sales open with a ``QueueProgress`` every this many of their events unless set otherwise."""


def progress_every_from_env(env: Mapping[str, str]) -> int | None:
    """``FLASHSALE_PROGRESS_EVERY`` (0: sales open without progress facts)."""
    return env_int(env, "FLASHSALE_PROGRESS_EVERY", PROGRESS_EVERY, 0, 1_000_000) or None


Holds = tuple[int, int, int]
"""A sale's order holds: payment window (ms), grace (ms), waitlist depth."""


class SaleClaims(Protocol):
    async def claim(self, sale_id: str, terms: str, by: str) -> str | None:
        """None when the id is now ours, else the terms it was claimed with."""
        ...

    async def opened(self, sale_id: str) -> dict[str, dict[str, Any]]:
        """The SKUs of the sale already projected as opened, with their terms."""
        ...


class SaleCommands(Protocol):
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
    ) -> None: ...


class SeedKeeper(Protocol):
    def commit(self, sale_id: str, skus: Sequence[str], reveal_at_ms: int, ends_at_ms: int) -> str:
        """The commitment of the sale's secret seed (the same one for a retried opening)."""
        ...

    def armed(self, sale_id: str) -> None:
        """Every SKU's SaleOpened is in the log: the seed may be revealed at the start."""
        ...

    def keep_ticking(self, sale_id: str, until_ms: int) -> None:
        """The sale clock must tick until ``until_ms`` (a sale's last hold deadline)."""
        ...


@dataclass
class Opening:
    """What happened to each SKU of a sale being opened."""

    sale_id: str
    opened: dict[str, dict[str, Any]] = field(default_factory=dict)  # SaleOpened records
    refused: dict[str, str] = field(default_factory=dict)  # reasons
    pending: list[str] = field(default_factory=list)  # no fact in time

    @property
    def complete(self) -> bool:
        return not self.refused and not self.pending

    def details(self) -> list[dict[str, object]]:
        """One entry per SKU, for an error answer."""
        out: list[dict[str, object]] = [{"sku": s, "outcome": "opened"} for s in self.opened]
        out += [{"sku": s, "outcome": "refused", "reason": r} for s, r in self.refused.items()]
        out += [{"sku": s, "outcome": "pending"} for s in self.pending]
        return out


class PostgresClaims:
    """``sale_claims`` rows through a psycopg async pool (or one async connection)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def claim(self, sale_id: str, terms: str, by: str) -> str | None:
        sql = (
            "INSERT INTO sale_claims (sale_id, terms, claimed_by) VALUES (%s, %s, %s) "
            "ON CONFLICT (sale_id) DO NOTHING"
        )
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, (sale_id, terms, by))
            if cur.rowcount == 1:
                return None
            row = await (
                await conn.execute(
                    "SELECT terms::text FROM sale_claims WHERE sale_id = %s", (sale_id,)
                )
            ).fetchone()
        return str(row[0]) if row else ""

    async def opened(self, sale_id: str) -> dict[str, dict[str, Any]]:
        sql = (
            "SELECT sku, allocation, per_user_limit, per_order_max, starts_at, ends_at "
            "FROM sales WHERE sale_id = %s"
        )
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(sql, (sale_id,))).fetchall()
        keys = ("allocation", "per_user_limit", "per_order_max")
        return {
            r[0]: {
                **dict(zip(keys, r[1:4], strict=True)),
                "sale_id": sale_id,
                "sku": r[0],
                "starts_at": int(r[4].timestamp() * 1000),
                "ends_at": int(r[5].timestamp() * 1000),
            }
            for r in rows
        }


def _terms(
    skus: Sequence[SkuAllocation],
    starts_at_ms: int,
    ends_at_ms: int,
    prequeue: int | None,
    progress_every: int | None,
    holds: Holds | None = None,
) -> str:
    """The claimed terms, canonical JSON (PostgreSQL's jsonb text is compared)."""
    body: dict[str, Any] = {"skus": [asdict(s) for s in skus], "starts_at": starts_at_ms,
                            "ends_at": ends_at_ms}  # fmt: skip
    if prequeue is not None:
        body["prequeue_opens_at"] = prequeue
    if progress_every is not None:
        body["progress_every"] = progress_every
    if holds is not None:
        body["hold_ms"], body["pay_grace_ms"], body["waitlist_depth"] = holds
    return json.dumps(body, sort_keys=True)


def _answers(
    sku: SkuAllocation,
    starts_at_ms: int,
    ends_at_ms: int,
    committed: str | None,
    holds: Holds | None = None,
) -> Callable[[Any], bool]:
    """Which fact answers this SKU's OpenSale: a SaleOpened with exactly these terms (another
    one is someone else's opening), or a refusal of an OpenSale."""

    def accept(fact: Any) -> bool:
        r = fact.record
        if fact.name == "SaleRefused":
            return bool(r.get("command") == "OpenSale")
        return fact.name == "SaleOpened" and (
            r["allocation"],
            r["per_user_limit"],
            r["per_order_max"],
            r["starts_at"],
            r["ends_at"],
            r.get("draw_commitment"),
            r.get("hold_ms"),
            r.get("pay_grace_ms") or 0,
            r.get("waitlist_depth") or 0,
        ) == (sku.allocation, sku.per_user_limit, sku.per_order_max, starts_at_ms, ends_at_ms,
              committed, *((None, 0, 0) if holds is None else holds))  # fmt: skip

    return accept


class SaleService:
    """``open_sale``: claim, write, wait for every SKU's fact."""

    def __init__(
        self,
        claims: SaleClaims,
        commands: SaleCommands,
        facts: FactSource,
        wait_s: float = 20.0,
        seeds: SeedKeeper | None = None,
        progress_every: int | None = PROGRESS_EVERY,
    ) -> None:
        self.claims = claims
        self.commands = commands
        self.facts = facts
        self.wait_s = wait_s
        self.seeds = seeds
        self.progress_every = progress_every  # the writer's QueueProgress cadence per sale

    async def open_sale(
        self,
        sale_id: str,
        skus: Sequence[SkuAllocation],
        starts_at_ms: int,
        ends_at_ms: int,
        by: str,
        prequeue_opens_at_ms: int | None = None,
        holds: Holds | None = None,
    ) -> Opening:
        """Every SKU's outcome; Refused("sale_exists") when the id is taken by other terms.
        ``holds``: (payment window ms, grace ms, waitlist depth), for a sale whose orders
        are held for payment (``processors.core.lifecycle``).

        Raises what the producer raises when Kafka does not acknowledge (the claim stays:
        a retry with the same terms goes on).
        """
        if prequeue_opens_at_ms is not None and self.seeds is None:
            raise Refused("no_prequeue", "this service keeps no draw seeds: no pre-queue here")
        if holds is not None and self.seeds is None:
            raise Refused("no_holds", "this service keeps no clock windows: no holds here")
        cadence = self.progress_every
        terms = _terms(skus, starts_at_ms, ends_at_ms, prequeue_opens_at_ms, cadence, holds)
        held = await self.claims.claim(sale_id, terms, by)
        opening = Opening(sale_id)
        if held is not None:
            # The same SKUs and numbers, with or without a pre-queue (a window given relative
            # to "now" moves on a retry).
            was, now = json.loads(held), json.loads(terms)
            # A retry writes the cadence of the first attempt (another server, another
            # setting): the writer refuses an OpenSale whose terms differ in anything.
            cadence = was.get("progress_every")
            holding = ("hold_ms", "pay_grace_ms", "waitlist_depth")
            if (was["skus"], "prequeue_opens_at" in was, [was.get(k) for k in holding]) != (
                now["skus"],
                "prequeue_opens_at" in now,
                [now.get(k) for k in holding],
            ):
                raise Refused("sale_exists", f"sale {sale_id!r} already exists with other terms")
            # The same opening again (its first answer was lost): what is open stays open,
            # and a repeated OpenSale of it would get no new fact.
            opening.opened = await self.claims.opened(sale_id)
            for s in skus:
                if s.sku not in opening.opened and self.facts.knows(sale_id, s.sku):
                    window = {"starts_at": starts_at_ms, "ends_at": ends_at_ms}
                    opening.opened[s.sku] = {**asdict(s), "sale_id": sale_id, **window}
        todo = [s for s in skus if s.sku not in opening.opened]
        if holds is not None and self.seeds is not None:  # before any order can be held
            last_deadline = ends_at_ms + holds[0] + holds[1]
            await asyncio.to_thread(self.seeds.keep_ticking, sale_id, last_deadline)
        if not todo:
            return await self._armed(opening, prequeue_opens_at_ms)
        committed = None
        if prequeue_opens_at_ms is not None and self.seeds is not None:
            every = [s.sku for s in skus]
            committed = await asyncio.to_thread(
                self.seeds.commit, sale_id, every, starts_at_ms, ends_at_ms
            )
        waits = {
            s.sku: self.facts.expect(
                sale_id, s.sku, _answers(s, starts_at_ms, ends_at_ms, committed, holds)
            )
            for s in todo
        }
        try:
            write = functools.partial(
                self.commands.open_sale,
                prequeue_opens_at_ms=prequeue_opens_at_ms,
                draw_commitment=committed,
                progress_every=cadence,
                hold_ms=None if holds is None else holds[0],
                pay_grace_ms=0 if holds is None else holds[1],
                waitlist_depth=0 if holds is None else holds[2],
            )
            await asyncio.to_thread(write, sale_id, todo, starts_at_ms, ends_at_ms)
            await asyncio.wait(list(waits.values()), timeout=self.wait_s)
        finally:
            for sku, fut in waits.items():
                self.facts.forget(sale_id, sku, fut)
        for sku, fut in waits.items():
            if not fut.done() or fut.cancelled():
                opening.pending.append(sku)
                continue
            fact = fut.result()
            if fact.name == "SaleOpened":
                opening.opened[sku] = fact.record
            else:
                opening.refused[sku] = str(fact.record.get("detail") or fact.name)
        return await self._armed(opening, prequeue_opens_at_ms)

    async def _armed(self, opening: Opening, prequeue_opens_at_ms: int | None) -> Opening:
        """A complete pre-queue opening arms its seed: the clock may reveal it (it lands
        behind every SKU's SaleOpened); an incomplete one never reveals."""
        if opening.complete and prequeue_opens_at_ms is not None and self.seeds is not None:
            await asyncio.to_thread(self.seeds.armed, opening.sale_id)
        return opening
