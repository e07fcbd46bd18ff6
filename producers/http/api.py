"""The public API under /v1: post intents, read their status, follow them, read a sale."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from confluent_kafka import KafkaException
from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.responses import StreamingResponse

from producers.commands import NotAcknowledged
from producers.http.context import Ctx, EdgeContext, RateLimitedShopper, Shopper
from producers.http.errors import ApiError, unavailable
from producers.http.models import (
    IDEMPOTENCY_KEY,
    IntentQueued,
    IntentRequest,
    IntentStatus,
    SaleState,
    error_responses,
)
from producers.http.rules import check_intent, state_of
from producers.http.store import StoredIntent, status_of
from producers.identity import intent_id_for

router = APIRouter(prefix="/v1")


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
    sale_id: Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")],
    who: RateLimitedShopper,
    ctx: Ctx,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY)
    ] = None,
) -> IntentQueued:
    """Validate -> record the intent in PostgreSQL -> produce and await the ack -> 202."""
    key = idempotency_key or uuid.uuid4().hex
    intent = StoredIntent(
        intent_id_for(who.user_id, sale_id, key), who.user_id, sale_id, body.sku, body.quantity
    )
    try:
        check_intent(sale_id, await ctx.store.sale(sale_id), body.sku, body.quantity, _now())
    except ApiError:
        # A retry of an intent already answered 202 gets the same answer, whatever the sale
        # looks like now (its decision is the writer's, and it is made once).
        if idempotency_key is None or await ctx.store.find_intent(intent.intent_id) != intent:
            raise
    stored = await ctx.store.record_intent(intent, key)
    if stored != intent:
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was already used for a different intent "
            f"(sku {stored.sku!r}, quantity {stored.quantity}); use a new key",
        )
    await _produce_acknowledged(ctx, intent, key)
    ctx.metrics.intents_accepted.inc()
    url = f"/v1/intents/{intent.intent_id}"
    response.headers["Location"] = url
    return IntentQueued(intent_id=intent.intent_id, status_url=url)


async def _produce_acknowledged(ctx: EdgeContext, intent: StoredIntent, key: str) -> None:
    """Write the intent (acks=all) and wait for Kafka's ack, bounded; 503 when unknown."""
    timeout = ctx.config.ack_timeout_ms / 1000
    try:
        produced_id, fut = ctx.producer.submit_intent_async(
            intent.sale_id, intent.sku, intent.user_id, intent.quantity, key
        )
        assert produced_id == intent.intent_id
        await asyncio.wait_for(fut, timeout + 1.0)
    except (NotAcknowledged, TimeoutError, KafkaException):
        ctx.metrics.unavailable.inc()
        raise unavailable(
            "Kafka did not acknowledge the intent in time; its outcome is unknown. "
            "Retry with the same Idempotency-Key."
        ) from None


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
) -> dict[str, Any]:
    """queued (position may be null), accepted (with order_id) or rejected (with reason)."""
    row = await ctx.store.intent_status(intent_id)
    if row is None:
        raise ApiError(404, "unknown_intent", f"no intent {intent_id!r}")
    if row["user_id"] != who.user_id:
        raise ApiError(403, "forbidden", "this intent belongs to another user")
    return status_of(row)


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
