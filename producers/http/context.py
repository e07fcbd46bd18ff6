"""What the request handlers share within one app server, and the auth dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flashsale.pseudonyms import Pseudonyms
from producers.commands import CommandProducer
from producers.http.auth import Principal, TokenVerifier, Unauthenticated
from producers.http.config import EdgeSettings
from producers.http.errors import ApiError, unauthenticated
from producers.http.intake import IntakeService
from producers.http.livefeed import DecisionFeed
from producers.http.metrics import EdgeMetrics
from producers.http.ratelimit import RateLimiter
from producers.http.store import EdgeStore
from producers.http.views import IntentViews, SaleViews
from producers.sales import SaleService


@dataclass
class EdgeContext:
    """The clients of one app server, built by the composition root at start-up."""

    config: EdgeSettings
    tokens: TokenVerifier
    producer: CommandProducer
    store: EdgeStore
    feed: DecisionFeed
    limiter: RateLimiter
    metrics: EdgeMetrics
    intake: IntakeService
    readers: RateLimiter  # reads (GET status, GET sale): their own buckets
    sale_views: SaleViews
    intent_views: IntentViews
    sales: SaleService
    pseudonyms: Pseudonyms  # token sub -> the user id the log carries


async def context(request: Request) -> EdgeContext:
    """The running app's context.

    Every dependency here is ``async def``: FastAPI runs plain ``def`` dependencies in a
    thread pool, which costs milliseconds per request under load.
    """
    ctx: EdgeContext = request.app.state.edge
    return ctx


# Declared for the OpenAPI document only; the header is verified by ``caller``.
_bearer = HTTPBearer(auto_error=False, description="HS256 JWT from `flashsale token`")


async def caller(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The authenticated caller, as the token says; 401 with WWW-Authenticate otherwise."""
    try:
        return request.app.state.edge.tokens.verify(request.headers.get("authorization"))
    except Unauthenticated as exc:
        raise unauthenticated(str(exc)) from None


async def shopper(request: Request, who: Annotated[Principal, Depends(caller)]) -> Principal:
    """The caller if they hold the shopper role, under their pseudonym
    (``flashsale.pseudonyms``: nothing past this point sees the token's sub); 403 otherwise
    (roles are separate: an admin token runs sales, it does not buy or follow intents)."""
    if who.role != "shopper":
        raise ApiError(403, "forbidden", "this needs the shopper role")
    return Principal(await request.app.state.edge.pseudonyms.of(who.user_id), who.role)


async def rate_limited_shopper(
    request: Request, who: Annotated[Principal, Depends(shopper)]
) -> Principal:
    """The shopper, if their token bucket has a token; 429 with Retry-After otherwise."""
    rate_limit(request.app.state.edge, who.user_id)
    return who


def rate_limit(ctx: EdgeContext, user_id: str, limiter: RateLimiter | None = None) -> None:
    """Take a token from the user's bucket; 429 with Retry-After when it is empty."""
    limiter = ctx.limiter if limiter is None else limiter  # (an empty one is falsy)
    wait = limiter.check(user_id)
    if wait:
        ctx.metrics.rate_limited.inc()
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests: at most {limiter.rate:g}/s (burst {limiter.burst:g})",
            {"Retry-After": str(wait)},
        )


def read_limit(ctx: EdgeContext, request: Request, user_id: str | None) -> None:
    """The reads' own buckets: by user when authenticated, else by the client's address
    (the last X-Forwarded-For hop is the one our nginx appended)."""
    if user_id is None:
        forwarded = request.headers.get("x-forwarded-for", "")
        client = forwarded.rsplit(",", 1)[-1].strip() or (
            request.client.host if request.client else "?"
        )
        user_id = "ip:" + client
    rate_limit(ctx, user_id, ctx.readers)


async def reading_shopper(
    request: Request, who: Annotated[Principal, Depends(shopper)]
) -> Principal:
    """The shopper, if their reads' bucket has a token; 429 otherwise."""
    read_limit(request.app.state.edge, request, who.user_id)
    return who


async def admin(who: Annotated[Principal, Depends(caller)]) -> Principal:
    """The caller if they hold the admin role; 403 otherwise."""
    if not who.is_admin:
        raise ApiError(403, "forbidden", "this needs the admin role")
    return who


Ctx = Annotated[EdgeContext, Depends(context)]
Caller = Annotated[Principal, Depends(caller)]
Shopper = Annotated[Principal, Depends(shopper)]
RateLimitedShopper = Annotated[Principal, Depends(rate_limited_shopper)]
ReadingShopper = Annotated[Principal, Depends(reading_shopper)]
Admin = Annotated[Principal, Depends(admin)]
