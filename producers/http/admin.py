"""Admin API: open, close, pause, resume, add units to and cancel sales (one command per SKU
for its writer to decide, acknowledged by Kafka)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from confluent_kafka import KafkaException
from fastapi import APIRouter, Body, Path

from producers.commands import NotAcknowledged, SkuAllocation
from producers.http.context import Admin, Ctx
from producers.http.errors import ApiError, refusal, unavailable
from producers.http.models import (
    IDENT,
    AddUnitsRequest,
    CancelSaleRequest,
    CloseSaleRequest,
    OpenSaleRequest,
    SaleClosedReply,
    SaleCommandReply,
    SaleOpenedReply,
    SaleSkusRequest,
    SkuSpec,
    error_responses,
)
from producers.http.rules import Refused
from producers.sales import Opening
from projections.rows import utc

router = APIRouter(prefix="/v1/admin")
SaleId = Annotated[str, Path(min_length=1, max_length=128, pattern=IDENT)]


@router.post(
    "/sales",
    status_code=201,
    response_model=SaleOpenedReply,
    responses=error_responses(400, 401, 403, 409, 413, 422, 503, 504),
    summary="Open a sale: 201 once every SKU's writer has opened it (SaleOpened in the log)",
)
async def open_sale(
    body: OpenSaleRequest,
    who: Admin,
    ctx: Ctx,
) -> SaleOpenedReply:
    """Claim the sale id, write one OpenSale per SKU, wait for every SKU's fact.

    409 `sale_exists`: the id was claimed with other terms. 409 `sale_refused`: a SKU's
    writer refused (the details say which SKUs opened and why the others did not). 504
    `open_unconfirmed`: a SKU's fact did not arrive in time (details as above).
    """
    now = datetime.now(UTC)
    starts = body.starts_at or now + timedelta(seconds=float(body.starts_in_s or 0))
    ends = body.ends_at or starts + timedelta(seconds=float(body.duration_s or 0))
    if ends <= starts:
        raise ApiError(422, "invalid_window", "the sale must end after it starts")
    skus = [
        SkuAllocation(s.sku, s.allocation, s.per_user_limit, s.per_order_max) for s in body.skus
    ]
    starts_ms, ends_ms = int(starts.timestamp() * 1000), int(ends.timestamp() * 1000)
    prequeue_ms = None if body.prequeue_s is None else starts_ms - int(body.prequeue_s * 1000)
    holds = (
        None
        if body.hold_s is None
        else (int(body.hold_s * 1000), int(body.pay_grace_s * 1000), body.waitlist_depth)
    )
    try:
        opening = await ctx.sales.open_sale(
            body.sale_id,
            skus,
            starts_ms,
            ends_ms,
            await ctx.pseudonyms.of(who.user_id),  # an operator is a person too
            prequeue_opens_at_ms=prequeue_ms,
            holds=holds,
        )
    except Refused as exc:
        raise refusal(exc.code, exc.message) from None
    except (NotAcknowledged, KafkaException):
        raise unavailable("Kafka did not acknowledge in time; retry the same request") from None
    return _opened_reply(opening)


def _opened_reply(opening: Opening) -> SaleOpenedReply:
    if opening.refused:
        raise ApiError(409, "sale_refused",
                       f"the writers refused {len(opening.refused)} of the sale's SKUs",
                       None, opening.details())  # fmt: skip
    if opening.pending:
        message = (f"{len(opening.pending)} SKUs were not confirmed opened in time; "
                   "GET /v1/sales/{id} shows what is open")  # fmt: skip
        raise ApiError(504, "open_unconfirmed", message, None, opening.details())
    facts = [opening.opened[k] for k in sorted(opening.opened)]
    prequeue = facts[0].get("prequeue_opens_at")
    return SaleOpenedReply(
        sale_id=opening.sale_id,
        skus=[f["sku"] for f in facts],
        starts_at=utc(facts[0]["starts_at"]),
        ends_at=utc(facts[0]["ends_at"]),
        terms=[
            SkuSpec(
                sku=f["sku"],
                allocation=f["allocation"],
                per_user_limit=f["per_user_limit"],
                per_order_max=f["per_order_max"],
            )
            for f in facts
        ],
        prequeue_opens_at=None if prequeue is None else utc(prequeue),
        draw_commitment=facts[0].get("draw_commitment"),
        hold_s=None if facts[0].get("hold_ms") is None else facts[0]["hold_ms"] / 1000,
        pay_grace_s=(facts[0].get("pay_grace_ms") or 0) / 1000,
        waitlist_depth=facts[0].get("waitlist_depth") or 0,
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
    skus = await _skus(ctx, sale_id, request.skus)
    await _acknowledged(ctx.producer.close_sale, sale_id, skus, request.reason)
    return SaleClosedReply(sale_id=sale_id, skus=skus)


async def _skus(ctx: Any, sale_id: str, asked: list[str] | None) -> list[str]:
    """The SKUs a command goes to (default: every SKU of the sale); 404 for unknown ones.
    Known from the projection, or from this server's live feed (it reads the log, so a sale
    opened a moment ago is known before the projection has it)."""
    known = set(await ctx.store.sale(sale_id, fresh=True) or ())
    progress = ctx.feed.sale_progress(sale_id)
    if progress is not None:
        known |= set(progress.opened)
    if not known:
        raise ApiError(404, "unknown_sale", f"sale {sale_id!r} does not exist")
    skus = asked or sorted(known)
    unknown = [s for s in skus if s not in known]
    if unknown:
        raise ApiError(404, "unknown_sku", f"sale {sale_id!r} has no SKU {unknown[0]!r}")
    return skus


def _operator(path: str, summary: str) -> Callable[[Any], Any]:
    """The route of an operator's command: 202 once Kafka acknowledged it."""
    return router.post(path, status_code=202, response_model=SaleCommandReply,
                       responses=error_responses(400, 401, 403, 404, 413, 422, 503),
                       summary=summary)  # fmt: skip


@_operator(
    "/sales/{sale_id}/pause", "Pause a sale: intents arriving meanwhile wait, in order, none lost"
)
async def pause_sale(
    sale_id: SaleId, _: Admin, ctx: Ctx, body: Annotated[SaleSkusRequest | None, Body()] = None
) -> SaleCommandReply:
    """One PauseSale per SKU. The writer refuses it (SaleRefused in the log) for a sale that
    is over or whose pre-queue is not drawn yet; pausing again changes nothing."""
    skus = await _skus(ctx, sale_id, (body or SaleSkusRequest()).skus)
    await _acknowledged(ctx.producer.sale_command, "PauseSale", sale_id, skus)
    return SaleCommandReply(sale_id=sale_id, command="PauseSale", skus=skus)


@_operator(
    "/sales/{sale_id}/resume", "Resume a paused sale: what waited is decided in arrival order"
)
async def resume_sale(
    sale_id: SaleId, _: Admin, ctx: Ctx, body: Annotated[SaleSkusRequest | None, Body()] = None
) -> SaleCommandReply:
    """One ResumeSale per SKU (nothing for a SKU that is not paused)."""
    skus = await _skus(ctx, sale_id, (body or SaleSkusRequest()).skus)
    await _acknowledged(ctx.producer.sale_command, "ResumeSale", sale_id, skus)
    return SaleCommandReply(sale_id=sale_id, command="ResumeSale", skus=skus)


@_operator(
    "/sales/{sale_id}/units", "Add units to a SKU's allocation (the waitlist is served first)"
)
async def add_units(sale_id: SaleId, body: AddUnitsRequest, _: Admin, ctx: Ctx) -> SaleCommandReply:
    """One AddUnits, idempotent per `ref` (refused in the log for a sale that is over)."""
    skus = await _skus(ctx, sale_id, [body.sku])
    ref = body.ref or f"add-{uuid.uuid4().hex}"
    await _acknowledged(ctx.producer.sale_command, "AddUnits", sale_id, skus,
                        quantity=body.quantity, ref=ref)  # fmt: skip
    return SaleCommandReply(sale_id=sale_id, command="AddUnits", skus=skus, ref=ref)


@_operator(
    "/sales/{sale_id}/cancel", "Cancel a sale for good: holds released, paid orders refunded"
)
async def cancel_sale(
    sale_id: SaleId, _: Admin, ctx: Ctx, body: Annotated[CancelSaleRequest | None, Body()] = None
) -> SaleCommandReply:
    """One CancelSale per SKU: the sale closes, every hold is released, every paid order is
    refunded (the payment service does it), everyone waiting hears at once."""
    request = body or CancelSaleRequest()
    skus = await _skus(ctx, sale_id, request.skus)
    await _acknowledged(ctx.producer.sale_command, "CancelSale", sale_id, skus,
                        reason=request.reason)  # fmt: skip
    return SaleCommandReply(sale_id=sale_id, command="CancelSale", skus=skus)


async def _acknowledged(write: Callable[..., Any], *args: Any, **fields: Any) -> None:
    """Run a blocking produce-and-wait in a thread; 503 when Kafka did not acknowledge."""
    try:
        await asyncio.to_thread(write, *args, **fields)
    except (NotAcknowledged, KafkaException):
        raise unavailable("Kafka did not acknowledge in time; the outcome is unknown") from None
