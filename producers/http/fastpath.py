"""The hot route, ``POST /v1/sales/{sale_id}/intents``, as a raw ASGI handler.

FastAPI's dependency solving and route chain cost 230-400 µs of CPU per request here, more
than everything else an intent needs. This handler does the same work directly: the cached
token check, the role, the user's token bucket, validation (msgspec), then
``IntakeService.place_intent``, answering in the API's one error shape. The route stays
declared in FastAPI (``producers.http.api.post_intent``, the same service behind it): that
declaration is what ``/openapi.json`` describes, and it serves the route when
``FLASHSALE_HTTP_LEAN_INTENTS=0``. A unit test holds the two to the same answers.

Checks run in FastAPI's order for this route: the body limit (413), the token (401), the
role (403), the rate limit (429), then the path, the ``Idempotency-Key`` and the body
(400/422).
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from producers.http.auth import Unauthenticated
from producers.http.context import EdgeContext, rate_limit
from producers.http.errors import ApiError, error_body, not_acknowledged, refusal, unauthenticated
from producers.http.intake import Unacknowledged
from producers.http.metrics import EdgeMetrics
from producers.http.middleware import MAX_BODY
from producers.http.models import IDEMPOTENCY_KEY
from producers.http.rules import Refused

HOT_PATH = re.compile(r"/v1/sales/([^/]+)/intents")
_IDENT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
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
                       "must be 1-128 characters of A-Z a-z 0-9 _ . : -")  # fmt: skip
    raw_key = headers.get(b"idempotency-key")
    key = raw_key.decode("latin-1") if raw_key is not None else None
    if key is not None and not _KEY.fullmatch(key):
        raise _invalid(["header", "Idempotency-Key"], "string_pattern_mismatch",
                       "must be 1-128 characters of A-Z a-z 0-9 _ . : -")  # fmt: skip
    ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
    if not body or not (ctype == b"application/json" or ctype.endswith(b"+json")):
        raise _invalid(["body"], "missing" if not body else "model_attributes_type",
                       "a JSON object is required")  # fmt: skip
    try:
        intent = _decode(body)
    except msgspec.ValidationError as exc:
        raise _body_error(exc) from None
    except msgspec.DecodeError:
        raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
    if not _IDENT.fullmatch(intent.sku):
        raise _invalid(["body", "sku"], "string_pattern_mismatch",
                       "must be 1-128 characters of A-Z a-z 0-9 _ . : -")  # fmt: skip
    if not 1 <= intent.quantity <= MAX_QUANTITY:
        raise _invalid(["body", "quantity"], "range", f"must be 1 to {MAX_QUANTITY}")
    return intent, key


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
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise _too_large(max_body)  # before anything else, as EdgeMiddleware does
    raw_auth = headers.get(b"authorization")
    try:
        who = ctx.tokens.verify(raw_auth.decode("latin-1") if raw_auth is not None else None)
    except Unauthenticated as exc:
        raise unauthenticated(str(exc)) from None
    if who.role != "shopper":
        raise ApiError(403, "forbidden", "this needs the shopper role")
    rate_limit(ctx, who.user_id)
    intent, key = _validated(sale_id, headers, await _read_body(receive, max_body))
    try:
        return await ctx.intake.place_intent(who.user_id, sale_id, intent.sku, intent.quantity, key)
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
        self._latency = metrics.latency.labels(HotRoute.path)
        self._counts: dict[int, Any] = {}
        self._requests = metrics.requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or (match := HOT_PATH.fullmatch(scope["path"])) is None
            or (ctx := getattr(self.state, "edge", None)) is None
            or not ctx.config.lean_intents
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            placed = await _place(ctx, match.group(1), scope, receive, self.max_body)
        except ApiError as exc:
            data = _encode(error_body(exc.code, exc.message, exc.details))
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
            await self._answer(send, exc.status, data, extra, started)
            return
        ctx.metrics.intents_accepted.inc()
        url = placed.status_url
        data = _encode({"intent_id": placed.intent_id, "status": "queued", "status_url": url})
        await self._answer(send, 202, data, [(b"location", url.encode())], started)

    async def _answer(
        self, send: Send, status: int, data: bytes, extra: list[Any], started: float
    ) -> None:
        headers = [_JSON, (b"content-length", str(len(data)).encode()), self.served_by, *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        count = self._counts.get(status)
        if count is None:
            count = self._counts[status] = self._requests.labels(HotRoute.path, "POST", status)
        count.inc()
        self._latency.observe(time.perf_counter() - started)
