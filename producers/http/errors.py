"""The edge's errors and their one JSON shape: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


# The status of every domain refusal (producers.http.rules.Refused and the intake's).
REFUSAL_STATUS = {
    "unknown_sale": 404,
    "unknown_sku": 404,
    "order_max_exceeded": 422,
    "sale_closed": 409,
    "sale_ended": 409,
    "sold_out": 409,
    "idempotency_conflict": 409,
    "sale_exists": 409,
    "no_prequeue": 422,
    "no_holds": 422,
    "sale_unconfirmed": 503,
}


class ApiError(Exception):
    """An error answer: status, machine-readable code, human message, extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body every error response carries."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, details: Any = None
) -> JSONResponse:
    """A JSON error response."""
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def refusal(code: str, message: str) -> ApiError:
    """The HTTP answer to a domain refusal (a 503 one says when to retry)."""
    status = REFUSAL_STATUS[code]
    return ApiError(status, code, message, {"Retry-After": "1"} if status == 503 else None)


def unauthenticated(message: str) -> ApiError:
    """401 with the challenge RFC 6750 asks for."""
    return ApiError(
        401, "unauthenticated", message, {"WWW-Authenticate": 'Bearer realm="flashsale"'}
    )


def unavailable(message: str, retry_after: int = 1) -> ApiError:
    """503: a dependency did not answer in time; the outcome of a write is unknown."""
    return ApiError(503, "unavailable", message, {"Retry-After": str(retry_after)})


def not_acknowledged() -> ApiError:
    """503 for an intent Kafka did not acknowledge in time."""
    return unavailable(
        "Kafka did not acknowledge the intent in time; its outcome is unknown. "
        "Retry with the same Idempotency-Key."
    )


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "type": e.get("type"), "msg": e.get("msg")}
        for e in exc.errors()
    ]


def install(app: FastAPI) -> None:
    """Make every error, FastAPI's and Starlette's included, answer in the same JSON shape."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = _validation_details(exc)
        if any(d["type"] == "json_invalid" for d in details):
            return error_response(
                400, "malformed_json", "the body is not valid JSON", None, details
            )
        first = details[0] if details else {"loc": [], "msg": "invalid"}
        where = ".".join(first["loc"][1:] or first["loc"])
        return error_response(422, "invalid_request", f"{where}: {first['msg']}", None, details)

    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("postgres.unavailable", error=str(exc))
        return error_response(
            503, "unavailable", "the database did not answer in time; retry", {"Retry-After": "1"}
        )

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(psycopg.OperationalError, database_down)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
