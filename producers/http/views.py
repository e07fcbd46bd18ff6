"""Read-side answers that stay cheap under a spike: rendered once, validated by ETag."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel

from producers.http.errors import ApiError
from producers.http.feedfacts import NOT_FINAL
from producers.http.intake import Receipt, Receipts
from producers.http.models import IntentStatus, SaleState
from producers.http.rules import state_of
from producers.http.statuses import status_of_fact
from producers.http.store import EdgeStore, status_of


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A JSON answer, rendered once, with its strong ETag and caching rule."""

    body: bytes
    etag: str
    cache_control: str

    @classmethod
    def of(cls, model: BaseModel, cache_control: str) -> Rendered:
        body = model.model_dump_json().encode()
        return cls(body, '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"',
                   cache_control)  # fmt: skip

    def not_modified(self, if_none_match: str | None) -> bool:
        """RFC 9110: ``*`` or any listed tag (weak or strong) matches."""
        if not if_none_match:
            return False
        tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        return "*" in tags or self.etag in tags


def cached_json(request: Request, model: BaseModel, cache_control: str) -> Response:
    """The model as JSON with a strong ETag; 304 when the client already holds it."""
    return respond(request, Rendered.of(model, cache_control))


def respond(request: Request, rendered: Rendered) -> Response:
    headers = {"ETag": rendered.etag, "Cache-Control": rendered.cache_control}
    if rendered.not_modified(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    return Response(rendered.body, media_type="application/json", headers=headers)


class IntentViews:
    """``GET /v1/intents/{id}``: a decided intent's answer is final, so it is rendered once
    and kept (the last ``capacity`` of them); an undecided one is answered from its receipt."""

    def __init__(
        self,
        store: Any,
        receipts: Receipts,
        capacity: int = 200_000,
        miss_ttl_s: float = 0.5,
        decisions: Callable[[str], Any] | None = None,
        undecided: Callable[[int, int], bool] | None = None,
        waiting: Callable[[str, str, int | None, int | None], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.decisions = decisions  # the live feed's window: a decision before it is projected
        # The live feed: the writer of this partition has not reached this log time yet.
        self.undecided = undecided
        # The live feed: how far ahead of a waiting intent the writer is (its receipt's place).
        self.waiting = waiting
        self.receipts = receipts
        self.capacity = capacity
        self.miss_ttl_s = miss_ttl_s
        # intent id -> (user, body, etag, cache-control): plain tuples, untracked by the GC
        self._final: OrderedDict[str, tuple[str, bytes, str, str]] = OrderedDict()
        # Not projected yet, as of this time: a client polling a queued intent queries
        # PostgreSQL at most once per miss_ttl_s, not on every poll.
        self._misses: dict[str, float] = {}
        self.queries = 0

    def _keep(self, intent_id: str, user_id: str, status: IntentStatus) -> tuple[str, Rendered]:
        """A decision's answer is final: rendered once, kept (the last ``capacity``)."""
        rendered = Rendered.of(status, "private, max-age=86400, immutable")
        self._final[intent_id] = (user_id, rendered.body, rendered.etag, rendered.cache_control)
        if len(self._final) > self.capacity:
            self._final.popitem(last=False)
        return user_id, rendered

    async def get(
        self, user_id: str, intent_id: str, receipt: tuple[str, str, int, str] | None
    ) -> Rendered:
        """The caller's intent; ApiError 403 (another user's) or 404 (unknown, no receipt)."""
        kept = self._final.get(intent_id)
        hit = None if kept is None else (kept[0], Rendered(kept[1], kept[2], kept[3]))
        if hit is None and self.decisions is not None:
            fact = self.decisions(intent_id)  # decided (or queued), read from the log here
            if fact is not None:
                status = IntentStatus.model_validate(status_of_fact(fact))
                if fact.name in NOT_FINAL:  # its decision comes with the draw, or a unit
                    hit = (fact.record["user_id"], Rendered.of(status, "private, no-cache"))
                else:
                    hit = self._keep(intent_id, fact.record["user_id"], status)
        proven = None
        if hit is None and receipt is not None:
            sale_id, sku, quantity, proof = receipt
            proven = self.receipts.verify(proof, intent_id, user_id, sale_id, sku, quantity)
            if (
                proven is not None
                and proven.log_time_ms is not None
                and proven.partition is not None
                and self.undecided is not None
                and self.undecided(proven.partition, proven.log_time_ms)
            ):
                return self._queued(intent_id, sale_id, sku, quantity, proven)  # no query
        now = time.monotonic()
        if hit is None and now - self._misses.get(intent_id, -1e9) >= self.miss_ttl_s:
            self.queries += 1
            row = await self.store.intent_status(intent_id)
            if row is None:
                if len(self._misses) > self.capacity:
                    self._misses.clear()
                self._misses[intent_id] = now
            else:
                self._misses.pop(intent_id, None)
                status = IntentStatus.model_validate(status_of(row))
                hit = self._keep(intent_id, row["user_id"], status)
        if hit is not None:
            if hit[0] != user_id:
                raise ApiError(403, "forbidden", "this intent belongs to another user")
            return hit[1]
        if receipt is not None and proven is not None:
            sale_id, sku, quantity, _ = receipt
            return self._queued(intent_id, sale_id, sku, quantity, proven)
        raise ApiError(404, "unknown_intent", f"no intent {intent_id!r}")

    def _queued(
        self, intent_id: str, sale_id: str, sku: str, quantity: int, proven: Receipt
    ) -> Rendered:
        """Not decided yet: queued, with how far ahead of it the writer is when known."""
        ahead = {} if self.waiting is None else self.waiting(
            sale_id, sku, proven.partition, proven.offset)  # fmt: skip
        queued = IntentStatus(intent_id=intent_id, sale_id=sale_id, sku=sku,
                              quantity=quantity, status="queued", **ahead)  # fmt: skip
        return Rendered.of(queued, "private, no-cache")


class SaleViews:
    """``GET /v1/sales/{id}`` rendered at most once per ``ttl_s`` per sale, for everyone."""

    def __init__(
        self, store: EdgeStore, ttl_s: float = 0.5, clock: Callable[[], datetime] = _now
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.clock = clock
        self._views: dict[str, tuple[float, SaleState]] = {}
        self.rendered = 0

    async def get(self, sale_id: str) -> SaleState | None:
        """The sale's public state, or None for an unknown sale."""
        now = time.monotonic()
        hit = self._views.get(sale_id)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        skus = await self.store.sale(sale_id)
        if not skus:
            return None
        at = self.clock()
        state = SaleState(
            sale_id=sale_id,
            skus=[
                {  # type: ignore[misc]
                    "sku": t.sku,
                    "state": state_of(t, at),
                    "allocation": t.allocation + t.added,
                    "remaining": max(0, t.remaining),
                    "per_user_limit": t.per_user_limit,
                    "per_order_max": t.per_order_max,
                    "starts_at": t.starts_at,
                    "ends_at": t.ends_at,
                }
                for t in sorted(skus.values(), key=lambda t: t.sku)
            ],
        )
        self.rendered += 1
        if len(self._views) > 10_000:
            self._views.clear()
        self._views[sale_id] = (now, state)
        return state
