"""The app-server builds the HTTP bench compares the edge with (``FLASHSALE_HTTP_EMPTY``):
``1``, an ASGI app that answers without doing anything (the ceiling of nginx + uvicorn), and
``produce``, one that only writes the intent and answers after the ack (the floor of a 202
with Kafka from Python). Served by ``serve()`` exactly like the real app."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from flashsale.settings import Settings
from infra.stack import Endpoints


def variant(name: str, settings: Settings, endpoints: Endpoints) -> Any:
    """The ASGI app of ``FLASHSALE_HTTP_EMPTY=name``; a clear error for an unknown one."""
    if name == "1":
        return empty_app
    if name == "produce":
        return produce_app(settings, endpoints)
    raise SystemExit(f"FLASHSALE_HTTP_EMPTY={name!r}: must be 1 (empty app) or produce")


async def empty_app(scope: Any, receive: Any, send: Any) -> None:
    """The bench's ceiling: an ASGI app that answers every request without doing anything
    (200 to a GET, 202 ``{}`` to anything else), served exactly like the real one."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = message["type"] + ".complete"  # lifespan.startup.complete, ...shutdown...
            await send({"type": done})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    message = await receive()
    while message.get("more_body", False):
        message = await receive()
    status = 200 if scope["method"] == "GET" else 202
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


def produce_app(settings: Settings, endpoints: Endpoints) -> Any:
    """The bench's floor for a 202: an ASGI app that writes one intent per POST to the
    command topic (acks=all, the edge's producer) and answers 202 once Kafka acknowledged
    it, nothing else (no token, no checks, no receipt): what the edge costs beyond it is ours."""
    from flashsale.topics import TopicNames
    from producers.commands import CommandProducer

    state: dict[str, Any] = {}
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    # Real intents of the bench's sale, keys of this process's own: decided like the others.
    sale = os.environ.get("FLASHSALE_BENCH_SALE", "bench-floor")
    run = uuid.uuid4().hex[:12]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    producer = CommandProducer(
                        endpoints.bootstrap,
                        "bench-floor",
                        topic=TopicNames.of(settings).sku_commands,
                    )
                    producer.serve_acks_on(asyncio.get_running_loop())
                    state["producer"] = producer
                else:
                    await asyncio.to_thread(state["producer"].close)
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        await receive()
        if scope["method"] == "GET":  # /healthz
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        n = state["n"] = state.get("n", 0) + 1
        _, ack = state["producer"].submit_intent_async(sale, "b1", f"floor-{n % 5000}", 1,
                                                       f"{run}-{n}")  # fmt: skip
        await ack
        await send({"type": "http.response.start", "status": 202, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    return app
