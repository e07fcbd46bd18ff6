"""The public API under /v1: post intents, read their status, follow them, read a sale."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from producers.http.context import Ctx, EdgeContext, RateLimitedShopper, Shopper
from producers.http.errors import ApiError, not_acknowledged, refusal
from producers.http.intake import Unacknowledged
from producers.http.models import (
    IDEMPOTENCY_KEY,
    IntentQueued,
    IntentRequest,
    IntentStatus,
    SaleState,
    error_responses,
)
from producers.http.rules import Refused, state_of
from producers.http.store import status_of

router = APIRouter(prefix="/v1")


Ident = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


@router.post(
    "/sales/{sale_id}/intents",
    status_code=202,
    response_model=IntentQueued,
    responses=error_responses(400, 401, 403, 404, 409, 413, 422, 429, 503),
    summary="Ask to buy; 202 only once Kafka acknowledged the intent",
)
async def post_intent(
    response: Response,
    body: IntentRequest,
    sale_id: Ident,
    who: RateLimitedShopper,
    ctx: Ctx,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY)
    ] = None,
) -> IntentQueued:
    """Validate -> produce and await Kafka's ack -> 202. Nothing is written to PostgreSQL.

    Served by ``producers.http.fastpath`` unless ``FLASHSALE_HTTP_LEAN_INTENTS=0``: this
    declaration is what /openapi.json describes, and both call the same service.
    """
    try:
        placed = await ctx.intake.place_intent(
            who.user_id, sale_id, body.sku, body.quantity, idempotency_key
        )
    except Refused as exc:
        raise refusal(exc.code, exc.message) from None
    except Unacknowledged:
        ctx.metrics.unavailable.inc()
        raise not_acknowledged() from None
    ctx.metrics.intents_accepted.inc()
    response.headers["Location"] = placed.status_url
    return IntentQueued(intent_id=placed.intent_id, status_url=placed.status_url)


ReceiptIdent = Annotated[
    str | None, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
]


@router.get(
    "/intents/{intent_id}",
    response_model=IntentStatus,
    response_model_exclude_none=False,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Status of one of the caller's intents",
)
async def get_intent(
    intent_id: Annotated[str, Path(min_length=1, max_length=128)],
    who: Shopper,
    ctx: Ctx,
    sale_id: ReceiptIdent = None,
    sku: ReceiptIdent = None,
    quantity: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    receipt: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> dict[str, Any]:
    """queued (position may be null), accepted (with order_id) or rejected (with reason).

    Until the projection has the intent, the receipt in the 202's ``status_url`` (query
    parameters sale_id, sku, quantity, receipt) makes the answer ``queued``.
    """
    row = await ctx.store.intent_status(intent_id)
    if row is not None:
        if row["user_id"] != who.user_id:
            raise ApiError(403, "forbidden", "this intent belongs to another user")
        return status_of(row)
    if (
        sale_id is not None
        and sku is not None
        and quantity is not None
        and receipt is not None
        and ctx.intake.receipts.valid(receipt, intent_id, who.user_id, sale_id, sku, quantity)
    ):
        return {"intent_id": intent_id, "sale_id": sale_id, "sku": sku, "quantity": quantity,
                "status": "queued", "position": None, "order_id": None, "reason": None,
                "detail": None, "decided_at": None}  # fmt: skip
    raise ApiError(404, "unknown_intent", f"no intent {intent_id!r}")


@router.get(
    "/sales/{sale_id}",
    response_model=SaleState,
    responses=error_responses(404, 422, 503),
    summary="Public state of a sale per SKU (remaining may lag the log)",
)
async def get_sale(
    sale_id: Annotated[str, Path(min_length=1, max_length=128)],
    ctx: Ctx,
) -> SaleState:
    """open / not_open / ended / sold_out and remaining units per SKU."""
    skus = await ctx.store.sale(sale_id)
    if not skus:
        raise ApiError(404, "unknown_sale", f"sale {sale_id!r} does not exist")
    now = _now()
    return SaleState(
        sale_id=sale_id,
        skus=[
            {  # type: ignore[misc]
                "sku": t.sku,
                "state": state_of(t, now),
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


@router.get(
    "/me/events",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
        **error_responses(401, 403),
    },
    response_class=StreamingResponse,
    summary="Server-Sent Events: the caller's intents as they are decided",
)
async def my_events(request: Request, who: Shopper, ctx: Ctx) -> StreamingResponse:
    """One `event: intent` per decided intent; a comment line as heartbeat every 15 s."""
    return StreamingResponse(
        _stream(ctx, who.user_id, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(ctx: EdgeContext, user_id: str, request: Request) -> AsyncIterator[bytes]:
    queue = ctx.feed.subscribe(user_id)
    try:
        yield b": subscribed\n\n"
        while True:
            try:
                status = await asyncio.wait_for(queue.get(), ctx.config.heartbeat_s)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield b": heartbeat\n\n"
                continue
            # The same model as GET /v1/intents/{id}: one format (decided_at ends in Z).
            data = IntentStatus.model_validate(status).model_dump_json()
            yield f"id: {status['intent_id']}\nevent: intent\ndata: {data}\n\n".encode()
    finally:
        ctx.feed.unsubscribe(user_id, queue)


def _now() -> datetime:
    return datetime.now(UTC)
