"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from producers.http.context import Ctx

router = APIRouter()


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    """Always ok while the event loop runs."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Kafka and PostgreSQL answer (503 otherwise)",
    responses={503: {"description": "a dependency does not answer"}},
)
async def readyz(ctx: Ctx) -> JSONResponse:
    """Ready when a broker answers the producer and a pooled connection answers."""
    kafka = await asyncio.to_thread(ctx.producer.reachable, 2.0)
    try:
        postgres = await asyncio.wait_for(ctx.store.ping(), 3.0)
    except Exception:  # pool timeout or connection error: not ready
        postgres = False
    checks = {"kafka": kafka, "postgres": postgres}
    if all(checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    return JSONResponse(
        {"error": {"code": "not_ready", "message": f"not answering: {failing}"}, "checks": checks},
        status_code=503,
        headers={"Retry-After": "1"},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
async def metrics(ctx: Ctx) -> Response:
    """Text exposition format."""
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
