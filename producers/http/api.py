"""The public API under /v1: post intents, read their status, follow them, read a sale."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from producers.http.context import (
    Ctx,
    EdgeContext,
    RateLimitedShopper,
    ReadingShopper,
    Shopper,
    read_limit,
)
from producers.http.errors import ApiError, not_acknowledged, refusal
from producers.http.intake import Unacknowledged
from producers.http.models import (
    IDEMPOTENCY_KEY,
    IDENT,
    RECEIPT,
    IntentQueued,
    IntentRequest,
    IntentStatus,
    OrderStatus,
    SaleState,
    error_responses,
)
from producers.http.rules import Refused
from producers.http.statuses import ORDER_FACTS, order_status_of_fact, status_of_fact
from producers.http.views import cached_json, respond

router = APIRouter(prefix="/v1")


Ident = Annotated[str, Path(min_length=1, max_length=128, pattern=IDENT)]


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
    ctx.metrics.placed(placed.ack_s)
    response.headers["Location"] = placed.status_url
    return IntentQueued(intent_id=placed.intent_id, status_url=placed.status_url)


ReceiptIdent = Annotated[str | None, Query(min_length=1, max_length=128, pattern=IDENT)]


@router.get(
    "/intents/{intent_id}",
    response_model=IntentStatus,
    response_model_exclude_none=False,
    responses={
        304: {"description": "Not Modified (If-None-Match)"},
        **error_responses(401, 403, 404, 422, 429, 503),
    },
    summary="Status of one of the caller's intents",
)
async def get_intent(
    request: Request,
    intent_id: Annotated[str, Path(min_length=1, max_length=128)],
    who: ReadingShopper,
    ctx: Ctx,
    sale_id: ReceiptIdent = None,
    sku: ReceiptIdent = None,
    quantity: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    receipt: Annotated[str | None, Query(pattern=RECEIPT)] = None,
) -> Response:
    """queued (position may be null), accepted (with order_id) or rejected (with reason).

    Until the projection has the intent, the receipt in the 202's ``status_url`` (query
    parameters sale_id, sku, quantity, receipt) makes the answer ``queued``.
    """
    fields = (sale_id, sku, quantity, receipt)
    proof = None if None in fields else (sale_id, sku, quantity, receipt)
    return respond(request, await ctx.intent_views.get(who.user_id, intent_id, proof))  # type: ignore[arg-type]


@router.get(
    "/sales/{sale_id}",
    response_model=SaleState,
    responses={
        304: {"description": "Not Modified (If-None-Match)"},
        **error_responses(404, 422, 429, 503),
    },
    summary="Public state of a sale per SKU (remaining may lag the log)",
)
async def get_sale(
    request: Request,
    sale_id: Annotated[str, Path(min_length=1, max_length=128)],
    ctx: Ctx,
) -> Response:
    """open / not_open / ended / sold_out and remaining units per SKU.

    Rendered at most once per sale per half second while it is fresh, queried once at a time
    (a spike of readers costs about one query per half second), with an ETag; cacheable for
    a second.
    """
    read_limit(ctx, request, None)
    state = await ctx.sale_views.get(sale_id)
    if state is None:
        raise ApiError(404, "unknown_sale", f"sale {sale_id!r} does not exist")
    return cached_json(request, state, "public, max-age=1")


def _sse_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
        **error_responses(*codes),
    }


def _event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/me/events",
    responses=_sse_responses(401, 403, 422),
    response_class=StreamingResponse,
    summary="Server-Sent Events: the caller's intents as they are decided",
)
async def my_events(
    request: Request,
    who: Shopper,
    ctx: Ctx,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=2000)] = None,
) -> StreamingResponse:
    """One `event: intent` per decided intent, read from the decisions topic by this server
    (and one when an intent is queued in a pre-queue: `status` queued, its `position` and the
    pre-queue's `entrants`; its decision then carries its `draw_rank` of `draw_size`).

    While an intent this server answered 202 waits for the writer, `event: intent` with
    `status` queued, `ahead` (input records the writer decides first), `eta_s` (an estimate
    from the writer's recent rate; the queue is not throttled) and `sold_out`, at most once a
    second per intent as the writer's progress facts arrive, and at once for everyone
    waiting when the allocation is gone.

    Event ids are log positions: reconnect with `Last-Event-ID` (to any server) for exactly
    the events after it; `event: reset` when it is older than the server's window. A comment
    heartbeat every 15 s carries the current position as an `id:`.
    """
    return _event_stream(_stream(ctx, who.user_id, request, last_event_id))


async def _stream(
    ctx: EdgeContext, user_id: str, request: Request, last_event_id: str | None
) -> AsyncIterator[bytes]:
    feed = ctx.feed
    stream, gap = feed.subscribe(user_id, last_event_id)
    try:
        yield b": subscribed\n\n"
        if gap:
            reason = ('{"reason": "the position is older than this server\'s window; '
                      'read GET /v1/intents/{id} for what was missed"}')  # fmt: skip
            yield f"id: {feed.position_for(stream)}\nevent: reset\ndata: {reason}\n\n".encode()
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), ctx.config.heartbeat_s)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                # The position only when nothing is queued: it must not pass an unsent event.
                beat = f"id: {feed.position_for(stream)}\n" if stream.queue.empty() else ""
                yield f": heartbeat\n{beat}\n".encode()
                continue
            if item is None:
                return  # the client stalled: it resumes from its last event's id
            position, fact = item
            if fact.name in ORDER_FACTS:  # one of the user's orders moved
                order = OrderStatus.model_validate(order_status_of_fact(fact.name, fact.record))
                yield f"id: {position}\nevent: order\ndata: {order.model_dump_json()}\n\n".encode()
                continue
            # The same model as GET /v1/intents/{id}: one format (decided_at ends in Z).
            data = IntentStatus.model_validate(status_of_fact(fact)).model_dump_json()
            yield f"id: {position}\nevent: intent\ndata: {data}\n\n".encode()
    finally:
        feed.unsubscribe(stream)


@router.get(
    "/sales/{sale_id}/events",
    responses=_sse_responses(422, 429),
    response_class=StreamingResponse,
    summary="Server-Sent Events: a sale's units remaining per SKU, live from the log",
)
async def sale_events(request: Request, sale_id: Ident, ctx: Ctx) -> StreamingResponse:
    """`event: sale` with the units remaining per SKU when they change (at most twice a
    second), as of the decisions this server has read; for a pre-queue sale, also the
    pre-queue's size (`entrants`) as it fills. Opening one takes a token from the
    reads' bucket of the client's address."""
    read_limit(ctx, request, None)
    return _event_stream(_sale_stream(ctx, sale_id, request))


async def _sale_stream(ctx: EdgeContext, sale_id: str, request: Request) -> AsyncIterator[bytes]:
    yield b": subscribed\n\n"
    sent, idle = -1, 0.0
    while True:
        progress = ctx.feed.sale_progress(sale_id)
        if progress is not None and progress.version != sent:
            sent = progress.version
            skus: list[dict[str, Any]] = [
                {"sku": k, "remaining": max(0, v)} for k, v in sorted(progress.remaining.items())
            ]
            for sku in skus:  # a pre-queue's size so far, while it fills
                if sku["sku"] in progress.entrants:
                    sku["entrants"] = progress.entrants[sku["sku"]]
            data = json.dumps({"sale_id": sale_id, "skus": skus})
            yield f"event: sale\ndata: {data}\n\n".encode()
            idle = 0.0
        await asyncio.sleep(0.5)
        idle += 0.5
        if idle >= ctx.config.heartbeat_s:
            if await request.is_disconnected():
                return
            yield b": heartbeat\n\n"
            idle = 0.0
