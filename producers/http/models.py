"""Request and response bodies of the public API (unknown fields are rejected)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

IDENT = r"^[A-Za-z0-9_.:-]+$"  # sale ids, SKUs (1-128 characters)
IDENT_RULE = "must be 1-128 characters of A-Z a-z 0-9 _ . : -"
Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=IDENT)]
IDEMPOTENCY_KEY = r"^[A-Za-z0-9_.:-]{1,128}$"
# producers.http.intake.Receipts: the HMAC, then where the log put the intent (partition and
# broker append time in ms) when known.
RECEIPT = r"^[A-Za-z0-9_-]{22}(\.[0-9]{1,6}\.[0-9]{1,16}(\.[0-9]{1,19})?)?$"


class Strict(BaseModel):
    """Base: unknown fields are a 422, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class IntentRequest(Strict):
    """POST /v1/sales/{sale_id}/intents."""

    sku: Identifier
    quantity: Annotated[StrictInt, Field(ge=1, le=1_000_000)]


class IntentQueued(Strict):
    """202: the intent is durably in Kafka and will get exactly one decision."""

    intent_id: str
    status: Literal["queued"] = "queued"
    status_url: str


class IntentStatus(Strict):
    """GET /v1/intents/{intent_id}."""

    intent_id: str
    sale_id: str
    sku: str
    quantity: int
    status: Literal["queued", "waitlisted", "paused", "accepted", "rejected"]
    position: int | None = Field(
        default=None,
        description="While queued in a pre-queue: its place among the queued; while "
        "waitlisted (a sale with holds): its place in line when it joined; while paused (the "
        "operator paused the sale): its place among the intents waiting for the resume.",
    )
    order_id: str | None = None
    reason: str | None = None
    detail: str | None = None
    decided_at: datetime | None = None
    entrants: int | None = Field(
        default=None, description="While queued: the pre-queue's entries when it was queued."
    )
    queue_kind: Literal["entry", "repeat", "late"] | None = Field(
        default=None,
        description="While queued: the person's one entry in the draw, another intent of "
        "theirs (rejected already_queued at the draw), or one after the start (decided in log "
        "order behind the draw).",
    )
    draw_rank: int | None = Field(default=None, description="Its rank k in the draw, if drawn.")
    draw_size: int | None = Field(default=None, description="The draw's entries n, if drawn.")
    ahead: int | None = Field(
        default=None,
        description="While waiting for the writer: input records ahead of it, which the "
        "writer decides first (an upper bound: other SKUs of its partition count), as of the "
        "writer's latest progress fact.",
    )
    eta_s: float | None = Field(
        default=None,
        description="While waiting: `ahead` over the rate the writer has moved through its "
        "input lately, as this server measured it. An estimate, not a slot: the queue is not "
        "throttled.",
    )
    sold_out: bool | None = Field(
        default=None,
        description="While waiting: the allocation is gone as of the log; it will be rejected "
        "unless units come back.",
    )


class SkuState(Strict):
    """One SKU of a sale as the projections see it (remaining may lag the log)."""

    sku: str
    state: Literal["open", "not_open", "paused", "ended", "sold_out"]
    allocation: int = Field(description="With the units the operator added since it opened.")
    remaining: int
    per_user_limit: int
    per_order_max: int
    starts_at: datetime
    ends_at: datetime


class SaleState(Strict):
    """GET /v1/sales/{sale_id}."""

    sale_id: str
    skus: list[SkuState]


class SkuSpec(Strict):
    """One SKU's share of a new sale."""

    sku: Identifier
    allocation: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
    per_user_limit: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
    per_order_max: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]


# StrictFloat takes ints too (never bools or strings); a constraint on a union would reach
# the OpenAPI document as pydantic's ge/le instead of JSON Schema's minimum/maximum.
Seconds = Annotated[StrictFloat, Field(ge=-86_400, le=366 * 86_400)]


class OpenSaleRequest(Strict):
    """POST /v1/admin/sales: starts_at or starts_in_s, ends_at or duration_s."""

    sale_id: Identifier
    skus: Annotated[list[SkuSpec], Field(min_length=1, max_length=100)]
    starts_at: datetime | None = None
    starts_in_s: Seconds | None = None
    ends_at: datetime | None = None
    duration_s: Annotated[StrictFloat, Field(gt=0, le=366 * 86_400)] | None = None
    prequeue_s: Annotated[StrictFloat, Field(gt=0, le=366 * 86_400)] | None = Field(
        default=None,
        description="Open a pre-queue this many seconds before the start: intents in it are "
        "queued and drawn at the start, in an order anyone can recompute from the log.",
    )
    hold_s: Annotated[StrictFloat, Field(ge=1, le=86_400)] | None = Field(
        default=None,
        description="Hold each accepted intent's order this many seconds for its owner to pay "
        "(POST /v1/orders/{id}/pay); unpaid, it expires and its units go back on sale. "
        "Without it an accepted intent is final.",
    )
    pay_grace_s: Annotated[StrictFloat, Field(ge=0, le=3_600)] = Field(
        default=0.0,
        description="With holds: a payment started before the deadline may still succeed "
        "this long after it.",
    )
    waitlist_depth: Annotated[StrictInt, Field(ge=0, le=10_000)] = Field(
        default=0,
        description="With holds: up to this many intents that find no unit while held units "
        "may come back wait in line instead of being rejected.",
    )

    @model_validator(mode="after")
    def _one_of_each(self) -> OpenSaleRequest:
        if (self.starts_at is None) == (self.starts_in_s is None):
            raise ValueError("give exactly one of starts_at and starts_in_s")
        if (self.ends_at is None) == (self.duration_s is None):
            raise ValueError("give exactly one of ends_at and duration_s")
        for name in ("starts_at", "ends_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} needs a time zone (e.g. 2030-01-01T12:00:00Z)")
        if len({s.sku for s in self.skus}) != len(self.skus):
            raise ValueError("skus must be distinct")
        return self


class SaleOpenedReply(Strict):
    """Answer to opening a sale: every SKU's writer opened it; the terms in force."""

    sale_id: str
    skus: list[str]
    starts_at: datetime
    ends_at: datetime
    terms: list[SkuSpec]
    prequeue_opens_at: datetime | None = None
    draw_commitment: str | None = Field(
        default=None, description="SHA-256 (hex) of the draw's secret seed, revealed at the start."
    )
    hold_s: float | None = Field(default=None, description="Orders are held this long to pay.")
    pay_grace_s: float = 0.0
    waitlist_depth: int = 0


class OrderStatus(Strict):
    """An order's transition, on the owner's stream (``event: order``)."""

    order_id: str
    sale_id: str
    sku: str
    status: Literal["paying", "declined", "paid", "payment_voided", "refused", "expired",
                    "cancelled", "refunded"]  # fmt: skip
    attempt_id: str | None = Field(default=None, description="The payment attempt it concerns.")
    pay_by: datetime | None = Field(default=None, description="While paying: the deadline.")
    detail: str | None = Field(
        default=None, description="Why: a refused request's reason, a voided payment's."
    )
    at: datetime = Field(description="The log time of the command that caused it.")


class OrderCommandAccepted(Strict):
    """202 to paying or cancelling an order: the command is in the log; its writer decides."""

    order_id: str
    attempt_id: str | None = Field(default=None, description="The payment attempt (pay).")
    status: Literal["payment_requested", "cancel_requested"]


class CloseSaleRequest(Strict):
    """POST /v1/admin/sales/{sale_id}/close (every field optional)."""

    skus: Annotated[list[Identifier], Field(min_length=1, max_length=100)] | None = None
    reason: Annotated[str, Field(min_length=1, max_length=200)] = "closed by admin"


class SaleClosedReply(Strict):
    """Answer to closing a sale's SKUs."""

    sale_id: str
    skus: list[str]


class SaleSkusRequest(Strict):
    """POST /v1/admin/sales/{sale_id}/pause or /resume (every field optional)."""

    skus: Annotated[list[Identifier], Field(min_length=1, max_length=100)] | None = None


class CancelSaleRequest(SaleSkusRequest):
    """POST /v1/admin/sales/{sale_id}/cancel."""

    reason: Annotated[str, Field(min_length=1, max_length=200)] = "cancelled by admin"


class AddUnitsRequest(Strict):
    """POST /v1/admin/sales/{sale_id}/units."""

    sku: Identifier
    quantity: Annotated[int, Field(ge=1, le=1_000_000)]
    ref: Identifier | None = Field(
        default=None,
        description="Idempotency reference: the same ref again adds nothing (send one to "
        "retry safely; without it each request adds).",
    )


class SaleCommandReply(Strict):
    """Answer to an operator's command: written to each SKU's writer (Kafka acknowledged);
    its fact follows in the log (GET /v1/sales/{sale_id})."""

    sale_id: str
    command: str
    skus: list[str]
    ref: str | None = None


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str
    message: str
    details: list[dict[str, object]] | None = None


class ErrorReply(BaseModel):
    """Every error response."""

    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: these status codes answer with an ErrorReply."""
    return {c: {"model": ErrorReply} for c in codes}
