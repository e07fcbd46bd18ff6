"""The hot routes as raw ASGI handlers: ``POST /v1/sales/{sale_id}/intents`` and
``GET /v1/intents/{intent_id}``.

FastAPI's dependency solving and route chain cost 230-400 µs of CPU per request here, more
than everything else an intent needs. ``LeanEdge`` answers these two routes itself, before
any middleware: the cached token check, the role, the user's token bucket, validation
(msgspec for the body), then the same services the FastAPI routes call
(``IntakeService.place_intent``, ``IntentViews.get``), in the API's one error shape. The
routes stay declared in FastAPI (``producers.http.api``): those declarations are what
``/openapi.json`` describes, and they serve the routes when ``FLASHSALE_HTTP_LEAN_INTENTS=0``.

Checks run in FastAPI's order: the body's size (413) and syntax (400), the token (401), the
role (403), the rate limit (429), then the path, the headers or query and what the body
holds (422).
Unit tests compare status and error code case by case (the ``details`` of a 422 are
worded by msgspec here, by pydantic there).
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import psycopg
import structlog
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from producers.http.auth import Unauthenticated
from producers.http.context import EdgeContext, rate_limit
from producers.http.errors import (
    ApiError,
    error_body,
    not_acknowledged,
    refusal,
    unauthenticated,
    unavailable,
)
from producers.http.intake import Unacknowledged
from producers.http.metrics import EdgeMetrics
from producers.http.middleware import MAX_BODY
from producers.http.models import IDEMPOTENCY_KEY, IDENT, IDENT_RULE, RECEIPT
from producers.http.rules import Refused

log = structlog.get_logger(__name__)

HOT_PATH = re.compile(r"/v1/sales/([^/]+)/intents")
STATUS_PATH = re.compile(r"/v1/intents/([^/]+)")
STATUS_ROUTE = "/v1/intents/{intent_id}"
_RECEIPT = re.compile(RECEIPT.strip("^$"))
_IDENT = re.compile(IDENT.strip("^$").replace("+", "{1,128}"))
_KEY = re.compile(IDEMPOTENCY_KEY.strip("^$"))
MAX_QUANTITY = 1_000_000


class HotRoute:
    """The route's template, as the request metrics name it."""

    path = "/v1/sales/{sale_id}/intents"


class IntentBody(msgspec.Struct, forbid_unknown_fields=True):
    """The body, as ``producers.http.models.IntentRequest`` declares it."""

    sku: str
    quantity: int


_decode = msgspec.json.Decoder(IntentBody).decode
_encode = msgspec.json.Encoder().encode
_JSON = (b"content-type", b"application/json")


def _invalid(where: list[str], kind: str, msg: str) -> ApiError:
    """422 in the shape FastAPI's validation errors get (``producers.http.errors``)."""
    text = ".".join(where[1:] or where)
    return ApiError(422, "invalid_request", f"{text}: {msg}", None,
                    [{"loc": where, "type": kind, "msg": msg}])  # fmt: skip


def _body_error(exc: msgspec.ValidationError) -> ApiError:
    text = str(exc)
    msg, _, at = text.partition(" - at `$")
    field = re.search(r"field `([^`]+)`", msg)
    path = at.rstrip("`").lstrip(".").split(".") if at else [field.group(1)] if field else []
    return _invalid(["body", *[p for p in path if p]], "value_error", msg)


def _validated(
    sale_id: str, headers: dict[bytes, bytes], body: bytes
) -> tuple[IntentBody, str | None]:
    if not _IDENT.fullmatch(sale_id):
        raise _invalid(["path", "sale_id"], "string_pattern_mismatch",
                       IDENT_RULE)  # fmt: skip
    raw_key = headers.get(b"idempotency-key")
    key = raw_key.decode("latin-1") if raw_key is not None else None
    if key is not None and not _KEY.fullmatch(key):
        raise _invalid(["header", "Idempotency-Key"], "string_pattern_mismatch",
                       IDENT_RULE)  # fmt: skip
    if not _is_json(headers) or not body:
        raise _invalid(["body"], "missing" if not body else "model_attributes_type",
                       "a JSON object is required")  # fmt: skip
    try:
        intent = _decode(body)
    except msgspec.ValidationError as exc:
        raise _body_error(exc) from None
    if not _IDENT.fullmatch(intent.sku):
        raise _invalid(["body", "sku"], "string_pattern_mismatch",
                       IDENT_RULE)  # fmt: skip
    if not 1 <= intent.quantity <= MAX_QUANTITY:
        raise _invalid(["body", "quantity"], "range", f"must be 1 to {MAX_QUANTITY}")
    return intent, key


def _is_json(headers: dict[bytes, bytes]) -> bool:
    ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
    return ctype == b"application/json" or ctype.endswith(b"+json")


def _well_formed(headers: dict[bytes, bytes], body: bytes) -> None:
    """400 for a JSON body that does not parse: FastAPI parses it before any dependency (the
    token included), so this comes before 401; what it holds is checked after them."""
    if body and _is_json(headers):
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise ApiError(400, "malformed_json", "the body is not valid JSON") from None


def _too_large(max_body: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body is larger than {max_body} bytes")


async def _read_body(receive: Receive, max_body: int) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > max_body:
            raise _too_large(max_body)
        return body
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_body:
            raise _too_large(max_body)
    return b"".join(chunks)


async def _place(
    ctx: EdgeContext, sale_id: str, scope: Scope, receive: Receive, max_body: int
) -> Any:
    headers = _headers(scope)
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise _too_large(max_body)  # before anything else, as EdgeMiddleware does
    body = await _read_body(receive, max_body)  # 413 first, chunked bodies too (as FastAPI)
    _well_formed(headers, body)
    user_id = await _shopper(ctx, headers)
    rate_limit(ctx, user_id)
    intent, key = _validated(sale_id, headers, body)
    try:
        return await ctx.intake.place_intent(user_id, sale_id, intent.sku, intent.quantity, key)
    except Refused as exc:
        raise refusal(exc.code, exc.message) from None
    except Unacknowledged:
        ctx.metrics.unavailable.inc()
        raise not_acknowledged() from None


class LeanEdge:
    """The app server's outermost ASGI app: answers the hot route itself, before any
    middleware (each layer of Starlette's costs per request), and passes everything else to
    the FastAPI app. It does for the hot route what ``EdgeMiddleware`` does for the others:
    the body limit, ``X-Served-By`` and the request metrics."""

    def __init__(self, app: FastAPI, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.state = app.state
        self.max_body = max_body
        self.served_by = (b"x-served-by", app.state.server_id.encode())
        metrics: EdgeMetrics = app.state.metrics
        self._latency = {r: metrics.latency.labels(r) for r in (HotRoute.path, STATUS_ROUTE)}
        self._counts: dict[tuple[str, int], Any] = {}
        self._requests = metrics.requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = getattr(self.state, "edge", None)
        if scope["type"] != "http" or ctx is None or not ctx.config.lean_intents:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and (match := HOT_PATH.fullmatch(scope["path"])):
            await self._post_intent(ctx, match.group(1), scope, receive, send)
        elif scope["method"] == "GET" and (match := STATUS_PATH.fullmatch(scope["path"])):
            await self._intent_status(ctx, match.group(1), scope, send)
        else:
            await self.app(scope, receive, send)

    async def _post_intent(
        self, ctx: EdgeContext, sale_id: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = time.perf_counter()
        route = HotRoute.path
        try:
            placed = await _place(ctx, sale_id, scope, receive, self.max_body)
        except Exception as exc:
            await self._error(send, _as_api_error(exc), route, started)
            return
        ctx.metrics.placed(placed.ack_s)
        url = placed.status_url
        data = _encode({"intent_id": placed.intent_id, "status": "queued", "status_url": url})
        await self._answer(send, 202, data, [(b"location", url.encode())], route, started)

    async def _intent_status(
        self, ctx: EdgeContext, intent_id: str, scope: Scope, send: Send
    ) -> None:
        """``GET /v1/intents/{id}`` as ``producers.http.api.get_intent`` answers it."""
        started = time.perf_counter()
        headers = _headers(scope)
        try:
            user_id = await _shopper(ctx, headers)
            rate_limit(ctx, user_id, ctx.readers)
            proof = _status_query(intent_id, scope.get("query_string", b""))
            rendered = await ctx.intent_views.get(user_id, intent_id, proof)
        except Exception as exc:
            await self._error(send, _as_api_error(exc), STATUS_ROUTE, started)
            return
        cache = [(b"etag", rendered.etag.encode()),
                 (b"cache-control", rendered.cache_control.encode())]  # fmt: skip
        inm = headers.get(b"if-none-match")
        if rendered.not_modified(inm.decode("latin-1") if inm is not None else None):
            await send({"type": "http.response.start", "status": 304,
                        "headers": [self.served_by, *cache]})  # fmt: skip
            await send({"type": "http.response.body", "body": b""})
            self._count(STATUS_ROUTE, "GET", 304, started)
            return
        await self._answer(send, 200, rendered.body, cache, STATUS_ROUTE, started, "GET")

    async def _error(self, send: Send, exc: ApiError, route: str, started: float) -> None:
        data = _encode(error_body(exc.code, exc.message, exc.details))
        extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        method = "POST" if route == HotRoute.path else "GET"
        await self._answer(send, exc.status, data, extra, route, started, method)

    async def _answer(
        self,
        send: Send,
        status: int,
        data: bytes,
        extra: list[Any],
        route: str,
        started: float,
        method: str = "POST",
    ) -> None:
        headers = [_JSON, (b"content-length", str(len(data)).encode()), self.served_by, *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        self._count(route, method, status, started)

    def _count(self, route: str, method: str, status: int, started: float) -> None:
        count = self._counts.get((route, status))
        if count is None:
            count = self._counts[(route, status)] = self._requests.labels(route, method, status)
        count.inc()
        self._latency[route].observe(time.perf_counter() - started)


def _as_api_error(exc: Exception) -> ApiError:
    """The answer to an exception, as ``producers.http.errors.install`` gives the FastAPI
    routes: PostgreSQL not answering is a 503, anything unexpected a logged 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, psycopg.OperationalError):
        log.warning("postgres.unavailable", error=str(exc))
        return unavailable("the database did not answer in time; retry")
    log.exception("edge.unexpected_error")
    return ApiError(500, "internal_error", "an unexpected error; the outcome is unknown")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by name; the first of repeated ones, as Starlette's ``get`` reads."""
    return dict(reversed(scope["headers"]))


async def _shopper(ctx: EdgeContext, headers: dict[bytes, bytes]) -> str:
    """The caller's pseudonym if they hold the shopper role (401/403 otherwise)."""
    raw_auth = headers.get(b"authorization")
    try:
        who = ctx.tokens.verify(raw_auth.decode("latin-1") if raw_auth is not None else None)
    except Unauthenticated as exc:
        raise unauthenticated(str(exc)) from None
    if who.role != "shopper":
        raise ApiError(403, "forbidden", "this needs the shopper role")
    return await ctx.pseudonyms.of(who.user_id)


def _status_query(intent_id: str, query_string: bytes) -> tuple[str, str, int, str] | None:
    """The receipt fields of the status URL, validated as the FastAPI route declares them."""
    if len(intent_id) > 128:
        raise _invalid(["path", "intent_id"], "string_too_long", "at most 128 characters")
    query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    for name in ("sale_id", "sku"):
        value = query.get(name)
        if value is not None and not _IDENT.fullmatch(value):
            raise _invalid(["query", name], "string_pattern_mismatch",
                           IDENT_RULE)  # fmt: skip
    raw_quantity = query.get("quantity")
    quantity = None
    if raw_quantity is not None:
        digits = raw_quantity.strip().removeprefix("+")
        if not (digits.isascii() and digits.isdigit()):
            raise _invalid(["query", "quantity"], "int_parsing", "must be an integer")
        quantity = int(raw_quantity)
        if not 1 <= quantity <= MAX_QUANTITY:
            raise _invalid(["query", "quantity"], "range", f"must be 1 to {MAX_QUANTITY}")
    receipt = query.get("receipt")
    if receipt is not None and not _RECEIPT.fullmatch(receipt):
        raise _invalid(["query", "receipt"], "string_pattern_mismatch", "not a receipt")
    sale_id, sku = query.get("sale_id"), query.get("sku")
    if sale_id is None or sku is None or quantity is None or receipt is None:
        return None
    return sale_id, sku, quantity, receipt
