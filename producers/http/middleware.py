"""ASGI middleware: body size limit, X-Served-By, and per-route request metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producers.http.errors import error_body
from producers.http.metrics import EdgeMetrics

MAX_BODY = 4096
STREAM_ROUTES = frozenset({"/v1/me/events", "/v1/sales/{sale_id}/events"})


async def _send_json(send: Send, status: int, body: dict[str, Any], extra: list[Any]) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class EdgeMiddleware:
    """Outermost layer of the app: everything it answers is counted and tagged."""

    def __init__(
        self, app: ASGIApp, metrics: EdgeMetrics, server_id: str, max_body: int = MAX_BODY
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.served_by = (b"x-served-by", server_id.encode())
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), self.served_by]
            await send(message)

        try:
            limited = await self._limit_body(scope, receive)
            if limited is None:
                too_large = error_body(
                    "body_too_large", f"the body is larger than {self.max_body} bytes"
                )
                await _send_json(tagged, 413, too_large, [])
                return
            await self.app(scope, limited, tagged)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(path, method, str(status)).inc()
            if path not in STREAM_ROUTES:
                self.metrics.latency.labels(path).observe(time.perf_counter() - started)

    async def _limit_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """The receive to use, or None when the body is over the limit."""
        length = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if length is not None:
            return receive if not length.isdigit() or int(length) <= self.max_body else None
        if not chunked:
            return receive
        # Chunked: read it all (bounded) before the app sees it, then replay.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
