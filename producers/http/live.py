"""The live sale page: charts of one sale, updating every second, for operators.

``GET /live/sales/{sale_id}`` serves the page (``static/live.html``, charts drawn by the
vendored uPlot); the page polls ``GET /live/sales/{sale_id}/data``:

* ``series``: the sale's per-second series from the analytics projection
  (``projections.analytics_series``): intents received and decided per second, accepted and
  rejected, decision latency p50/p99, stock remaining per SKU, queue length; and totals;
* ``services``: every process of the namespace from its ``/metrics`` (CPU, work per second,
  consumer lag per service), scraped by this app server at most once a second;
* ``autoscale``: the autoscaler's latest sample and its last decisions (``infra.autoscale``).

Like ``/metrics`` it is served on each app server's own port, never through nginx.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from flashsale.scrape import WORK, Scrape, rate, scrape, targets
from flashsale.settings import Settings
from infra import autoscale
from producers.http.context import Ctx
from producers.http.errors import ApiError
from projections.analytics_series import read_series_async

router = APIRouter(prefix="/live", include_in_schema=False)

_STATIC = resources.files("producers.http") / "static"
_TYPES = {"uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}


class ServiceScraper:
    """The namespace's processes, scraped at most once a second (rates between scrapes)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._before: dict[str, Scrape] = {}
        self._view: list[dict[str, Any]] = []
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def view(self) -> list[dict[str, Any]]:
        async with self._lock:
            if time.monotonic() - self._at >= 1.0:
                now = await asyncio.to_thread(self._scrape_all)
                self._view = [self._row(s) for s in now]
                self._before = {s.key: s for s in now}
                self._at = time.monotonic()
            return self._view

    def _scrape_all(self) -> list[Scrape]:
        return [scrape(t, timeout=0.5) for t in targets(self.settings)]

    def _row(self, s: Scrape) -> dict[str, Any]:
        before = self._before.get(s.key)
        lagging = [v for (n, _), v in s.samples.items() if n == "flashsale_consumer_lag"]
        work, _ = WORK.get(s.kind, (None, None))
        return {
            "name": s.name,
            "up": s.error is None,
            "cpu": rate(s, before, "process_cpu_seconds_total"),
            "rss_mb": round(s.value("process_resident_memory_bytes") / 2**20, 1),
            "work_per_s": rate(s, before, work) if work else None,
            "lag": sum(lagging) if lagging else None,
        }


class SeriesCache:
    """Each sale's series, made at most once a second per app server (every viewer polls)."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._made: dict[str, tuple[float, dict[str, Any]]] = {}

    async def get(self, ctx: Ctx, sale_id: str) -> dict[str, Any]:
        made = self._made.get(sale_id)
        if made is not None and time.monotonic() - made[0] < 1.0:
            return made[1]
        async with ctx.store.pool.connection() as conn:
            found = await read_series_async(conn, sale_id)
        if found is None:
            raise ApiError(404, "unknown_sale", f"no analytics for sale {sale_id!r} yet")
        if len(self._made) >= self.keep:
            self._made.clear()
        self._made[sale_id] = (time.monotonic(), found)
        return found


@router.get("/sales/{sale_id}")
async def page(sale_id: str) -> HTMLResponse:
    """The page itself (its data comes from ``/data``)."""
    html = (_STATIC / "live.html").read_text()
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@router.get("/sales/{sale_id}/data")
async def data(sale_id: str, ctx: Ctx, request: Request) -> JSONResponse:
    """The sale's series and the namespace's services, now."""
    scraper: ServiceScraper = request.app.state.live_scraper
    cache: SeriesCache = request.app.state.live_series
    found, services = await asyncio.gather(cache.get(ctx, sale_id), scraper.view())
    scaling = autoscale.recent(scraper.settings)  # two small files, while it runs
    return JSONResponse({"series": found, "services": services, "autoscale": scaling,
                         "at": time.time()}, headers={"Cache-Control": "no-store"})  # fmt: skip


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """The vendored chart library."""
    if name not in _TYPES:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return Response((_STATIC / name).read_bytes(), media_type=_TYPES[name],
                    headers={"Cache-Control": "max-age=3600"})  # fmt: skip
