"""Orders of sales with holds: the owner pays or cancels a held order.

An accepted intent's order id is ``ord-<intent id>``, so the order's sale and SKU (which
route the command to its one writer) and its owner come from the intent's decision: this
server's live feed while it has it, the projection after. The edge only checks what it can
(the order exists, it is the caller's, it was accepted) and writes the command; the writer
decides (held, in time, no payment in progress) and its answer is a fact in the log:
``PaymentStarted`` or ``OrderRefused``, then the payment service's result (``OrderPaid``,
``PaymentDeclined``, ``PaymentVoided``), or ``HoldCancelled``.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Annotated, Any

from confluent_kafka import KafkaException
from fastapi import APIRouter, Header, Path

from producers.commands import NotAcknowledged
from producers.http.context import Ctx, RateLimitedShopper
from producers.http.errors import ApiError, unavailable
from producers.http.feedfacts import NOT_FINAL
from producers.http.models import IDEMPOTENCY_KEY, OrderCommandAccepted, error_responses

router = APIRouter(prefix="/v1/orders")
OrderId = Annotated[str, Path(min_length=5, max_length=132, pattern=r"^ord-[A-Za-z0-9_.:-]+$")]


async def _order(ctx: Any, order_id: str, user_id: str) -> tuple[str, str]:
    """(sale, SKU) of the caller's accepted order; 404, 403 or 409 otherwise."""
    intent_id = order_id.removeprefix("ord-")
    fact = ctx.feed.decision(intent_id)
    if fact is not None and fact.name not in NOT_FINAL:
        record, accepted = fact.record, fact.name == "IntentAccepted"
    else:  # not in this server's window, or still waiting here: the projection may know
        row = await ctx.store.intent_status(intent_id)
        if row is None and fact is not None:
            if fact.record["user_id"] != user_id:
                raise ApiError(403, "forbidden", "this order belongs to another user")
            raise ApiError(409, "order_pending", f"intent {intent_id!r} is {fact.name} (not "
                           "decided yet as far as this server has read): retry once it is "
                           "accepted")  # fmt: skip
        if row is None:
            raise ApiError(404, "unknown_order", f"no order {order_id!r} (yet)")
        record, accepted = row, row.get("outcome") == "accepted"
    if record["user_id"] != user_id:
        raise ApiError(403, "forbidden", "this order belongs to another user")
    if not accepted:
        raise ApiError(409, "not_an_order", f"intent {intent_id!r} was not accepted")
    return str(record["sale_id"]), str(record["sku"])


async def _write(ctx: Any, name: str, sale_id: str, sku: str, **fields: Any) -> None:
    try:
        await asyncio.to_thread(ctx.producer.order_command, name, sale_id, sku, **fields)
    except (NotAcknowledged, KafkaException):
        raise unavailable("Kafka did not acknowledge in time; retry the same request") from None


@router.post(
    "/{order_id}/pay",
    status_code=202,
    response_model=OrderCommandAccepted,
    responses=error_responses(400, 401, 403, 404, 409, 422, 429, 503),
    summary="Pay a held order: 202 once the payment request is in the log",
)
async def pay(
    order_id: OrderId,
    who: RateLimitedShopper,
    ctx: Ctx,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY)
    ] = None,
) -> OrderCommandAccepted:
    """Writes `StartPayment`; the same `Idempotency-Key` is the same payment attempt (decided
    once). The writer starts it only for a held order before its deadline; the payment
    service then charges and records the result. Outcomes are facts of the sale's log."""
    sale_id, sku = await _order(ctx, order_id, who.user_id)
    key = idempotency_key or uuid.uuid4().hex
    attempt = "pay-" + hashlib.blake2b(f"{who.user_id}\x1f{order_id}\x1f{key}".encode(),
                                       digest_size=12).hexdigest()  # fmt: skip
    await _write(ctx, "StartPayment", sale_id, sku, order_id=order_id, user_id=who.user_id,
                 attempt_id=attempt)  # fmt: skip
    return OrderCommandAccepted(order_id=order_id, attempt_id=attempt, status="payment_requested")


@router.post(
    "/{order_id}/cancel",
    status_code=202,
    response_model=OrderCommandAccepted,
    responses=error_responses(400, 401, 403, 404, 409, 422, 429, 503),
    summary="Give a held order up: 202 once the request is in the log",
)
async def cancel(order_id: OrderId, who: RateLimitedShopper, ctx: Ctx) -> OrderCommandAccepted:
    """Writes `CancelHold`; the writer releases the hold (units back on sale) unless a
    payment is in progress or the order is no longer held."""
    sale_id, sku = await _order(ctx, order_id, who.user_id)
    await _write(ctx, "CancelHold", sale_id, sku, order_id=order_id, user_id=who.user_id)
    return OrderCommandAccepted(order_id=order_id, attempt_id=None, status="cancel_requested")
