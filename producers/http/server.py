"""Composition root of one app server: build the clients from settings, wire, run uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from flashsale.settings import Settings
from infra.stack import Endpoints

DEFAULT_HOST = "127.0.0.1"
# The live feed's reader thread needs the GIL to hand each batch of decisions to the event
# loop; with the default 5 ms switch interval a busy loop delays it by up to 5 ms a turn.
SWITCH_INTERVAL_S = 0.0005


def build_app(
    settings: Settings,
    endpoints: Endpoints,
    config: Any = None,
    server_id: str = "",
    on_started: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app; its Kafka producer, pool and decision feed are created at start-up,
    then ``on_started`` runs (the server process's own settings, see ``serve``)."""
    from psycopg_pool import AsyncConnectionPool

    from flashsale.pseudonyms import Pseudonyms
    from flashsale.topics import TopicNames
    from producers.clock import DrawSeeds
    from producers.commands import CommandProducer
    from producers.http import admin, api, errors, live, ops, orders
    from producers.http.auth import Keyring, TokenVerifier, load_keyring, receipt_secret
    from producers.http.catchup import CommittedEnds, caught_up
    from producers.http.config import EdgeSettings
    from producers.http.context import EdgeContext
    from producers.http.intake import IntakeService, Receipts, RecentIntents
    from producers.http.livefeed import DecisionFeed
    from producers.http.metrics import EdgeMetrics
    from producers.http.middleware import EdgeMiddleware
    from producers.http.ratelimit import RateLimiter
    from producers.http.store import EdgeStore
    from producers.http.views import IntentViews, SaleViews
    from producers.sales import PostgresClaims, SaleService
    from schemas.codec import SchemaRegistry

    cfg: EdgeSettings = config or EdgeSettings.from_env()
    ident = cfg.server_id or server_id or socket.gethostname()
    metrics = EdgeMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        names = TopicNames.of(settings)

        def keyring() -> Keyring:
            return load_keyring(settings.state_dir, cfg.jwt_secret, cfg.jwt_keys_dir)

        producer = CommandProducer(
            endpoints.bootstrap,
            producer_name=f"http-edge-{ident}",
            timeout_ms=cfg.ack_timeout_ms,
            topic=names.sku_commands,
            linger_ms=cfg.linger_ms,
        )
        producer.serve_acks_on(asyncio.get_running_loop())
        pool = AsyncConnectionPool(
            endpoints.dsn, min_size=2, max_size=cfg.pool_size, open=False, timeout=5.0
        )
        await pool.open(wait=False)
        store = EdgeStore(pool)
        feed = DecisionFeed(
            endpoints.bootstrap, names.decisions, SchemaRegistry.load_default(), cfg.feed_window
        )
        await feed.start()
        ends = CommittedEnds(endpoints.bootstrap, names.decisions)
        limiter = RateLimiter(cfg.rate_per_s, cfg.rate_burst)
        receipts = Receipts(receipt_secret(settings.state_dir, cfg.jwt_secret))
        intake = IntakeService(
            store, producer, receipts, RecentIntents(cfg.recent_intents),
            cfg.ack_timeout_ms / 1000, in_log=feed.knows, on_placed=feed.placed,
            caught_up=lambda: caught_up(feed, ends, cfg.catch_up_s),
        )  # fmt: skip
        readers = RateLimiter(cfg.read_rate_per_s, cfg.read_rate_burst)
        app.state.edge = EdgeContext(
            config=cfg, tokens=TokenVerifier(keyring), producer=producer, store=store, feed=feed,
            limiter=limiter, metrics=metrics, intake=intake, readers=readers,
            sale_views=SaleViews(store),
            intent_views=IntentViews(store, intake.receipts, decisions=feed.decision,
                                     undecided=feed.undecided, waiting=feed.waiting.status),
            sales=SaleService(PostgresClaims(pool), producer, feed,
                              seeds=DrawSeeds(endpoints.dsn, settings.namespace),
                              progress_every=cfg.progress_every),
            pseudonyms=Pseudonyms(pool, settings.namespace),
        )  # fmt: skip
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await feed.stop()
            try:
                await ends.close()
            finally:
                await pool.close()
            await asyncio.to_thread(producer.close)

    app = FastAPI(
        title="flashsale HTTP edge",
        version="1",
        description="Purchase intents in, acknowledged by Kafka before the 202.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(api.router)
    app.include_router(admin.router)
    app.include_router(orders.router)
    app.include_router(ops.router)
    app.include_router(live.router)
    app.state.live_scraper = live.ServiceScraper(settings)
    app.state.live_series = live.SeriesCache()
    app.add_middleware(EdgeMiddleware, metrics=metrics, server_id=ident)
    app.state.metrics = metrics
    app.state.server_id = ident
    return app


def _freeze_heap() -> None:
    """Move everything alive after start-up (modules, classes, the app, its clients) out of
    the cyclic GC's reach. Without it every full collection walked ~100,000 such objects,
    60-170 ms with the loop stopped: the p99 of a loaded app server. They live as long as
    the process; a frozen object that later becomes garbage in a cycle is never collected,
    which bounds that leak by what start-up made."""
    gc.collect()
    gc.freeze()


def serve(port: int, host: str = DEFAULT_HOST) -> int:
    """Run one app server on host:port until SIGTERM/SIGINT."""
    import uvicorn

    from flashsale import logs
    from infra.stack import Stack
    from producers.http.fastpath import LeanEdge

    logs.configure(service="flashsale-http")
    settings = Settings.from_env()
    app = build_app(
        settings, Stack(settings).endpoints(), server_id=f"{host}:{port}", on_started=_freeze_heap
    )
    app.state.metrics.watch_gc()
    served: Any = LeanEdge(app)  # the hot route before any middleware; the rest to FastAPI
    bench_variant = os.environ.get("FLASHSALE_HTTP_EMPTY")  # `flashsale bench --only http` only
    if bench_variant:
        from producers.http.bench_apps import variant

        served = variant(bench_variant, settings, Stack(settings).endpoints())
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(
        served,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # nginx is the only client; nothing reads the client address
        server_header=False,
        log_config=None,
        backlog=4096,
        timeout_graceful_shutdown=5,
        # Longer than nginx keeps an idle upstream connection (60 s): otherwise uvicorn (5 s
        # by default) closes one nginx is about to reuse, and the request on it gets a 502
        # (nginx does not retry a POST). Seen in the demo after a few idle seconds.
        timeout_keep_alive=75,
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale http serve --port N` (one app server in the foreground)."""
    p = sub.add_parser("http", help="the HTTP edge")
    cmds = p.add_subparsers(dest="http_cmd", required=True)
    s = cmds.add_parser("serve", help="run one app server in the foreground")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", default=DEFAULT_HOST)
    p.set_defaults(run=lambda args, settings: serve(args.port, args.host))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m producers.http.server --port N`."""
    parser = argparse.ArgumentParser(prog="flashsale-http", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=DEFAULT_HOST)
    args = parser.parse_args(argv)
    return serve(args.port, args.host)


if __name__ == "__main__":
    sys.exit(main())
