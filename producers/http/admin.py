"""Admin API: open and close sales (OpenSale/CloseSale commands, acknowledged by Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from confluent_kafka import KafkaException
from fastapi import APIRouter, Body, Path

from producers.commands import NotAcknowledged, SkuAllocation
from producers.http.context import Admin, Ctx
from producers.http.errors import ApiError, unavailable
from producers.http.models import (
    CloseSaleRequest,
    OpenSaleRequest,
    SaleClosedReply,
    SaleOpenedReply,
    error_responses,
)

router = APIRouter(prefix="/v1/admin")
SaleId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


@router.post(
    "/sales",
    status_code=201,
    response_model=SaleOpenedReply,
    responses=error_responses(400, 401, 403, 409, 413, 422, 503),
    summary="Open a sale (one OpenSale command per SKU)",
)
async def open_sale(
    body: OpenSaleRequest,
    _: Admin,
    ctx: Ctx,
) -> SaleOpenedReply:
    """Publish the sale's terms; its state shows in GET /v1/sales/{id} once projected."""
    now = datetime.now(UTC)
    starts = body.starts_at or now + timedelta(seconds=float(body.starts_in_s or 0))
    ends = body.ends_at or starts + timedelta(seconds=float(body.duration_s or 0))
    if ends <= starts:
        raise ApiError(422, "invalid_window", "the sale must end after it starts")
    if await ctx.store.sale(body.sale_id, fresh=True):
        raise ApiError(409, "sale_exists", f"sale {body.sale_id!r} already exists")
    skus = [
        SkuAllocation(s.sku, s.allocation, s.per_user_limit, s.per_order_max) for s in body.skus
    ]
    starts_ms, ends_ms = int(starts.timestamp() * 1000), int(ends.timestamp() * 1000)
    await _acknowledged(ctx.producer.open_sale, body.sale_id, skus, starts_ms, ends_ms)
    return SaleOpenedReply(
        sale_id=body.sale_id, skus=[s.sku for s in skus], starts_at=starts, ends_at=ends
    )


@router.post(
    "/sales/{sale_id}/close",
    status_code=202,
    response_model=SaleClosedReply,
    responses=error_responses(400, 401, 403, 404, 413, 422, 503),
    summary="Close a sale's SKUs now (default: all of them)",
)
async def close_sale(
    sale_id: SaleId,
    _: Admin,
    ctx: Ctx,
    body: Annotated[CloseSaleRequest | None, Body()] = None,
) -> SaleClosedReply:
    """Publish one CloseSale per SKU."""
    request = body or CloseSaleRequest()
    known = await ctx.store.sale(sale_id, fresh=True)
    if not known:
        raise ApiError(404, "unknown_sale", f"sale {sale_id!r} does not exist")
    skus = request.skus or sorted(known)
    unknown = [s for s in skus if s not in known]
    if unknown:
        raise ApiError(404, "unknown_sku", f"sale {sale_id!r} has no SKU {unknown[0]!r}")
    await _acknowledged(ctx.producer.close_sale, sale_id, skus, request.reason)
    return SaleClosedReply(sale_id=sale_id, skus=skus)


async def _acknowledged(write: Callable[..., Any], *args: Any) -> None:
    """Run a blocking produce-and-wait in a thread; 503 when Kafka did not acknowledge."""
    try:
        await asyncio.to_thread(write, *args)
    except (NotAcknowledged, KafkaException):
        raise unavailable("Kafka did not acknowledge in time; the outcome is unknown") from None
