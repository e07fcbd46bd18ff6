"""Read-side answers that stay cheap under a spike: rendered once, validated by ETag."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import Request, Response
from pydantic import BaseModel

from producers.http.models import SaleState
from producers.http.rules import state_of
from producers.http.store import EdgeStore


def _now() -> datetime:
    return datetime.now(UTC)


def cached_json(request: Request, model: BaseModel, cache_control: str) -> Response:
    """The model as JSON with a strong ETag; 304 when the client already holds it."""
    body = model.model_dump_json().encode()
    return etagged(request, body, cache_control)


def etagged(request: Request, body: bytes, cache_control: str) -> Response:
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


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
                    "allocation": t.allocation,
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
