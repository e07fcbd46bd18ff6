"""A lean HTTP/1.1 keep-alive client for load generators (the demo's crowd, the bench).

httpx costs ~300 µs of CPU per request here: a crowd of thousands of requests per second
driven with it takes a core from the system it measures. This client writes the request
bytes itself over a pool of keep-alive connections and reads status, headers and a
``Content-Length`` body (what nginx answers for the API), ~30-40 µs a request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    seconds: float  # from the request's write to the end of its answer


class RawClient:
    """Requests over up to ``connections`` keep-alive connections to ``url`` (http://h:p)."""

    def __init__(self, url: str, connections: int = 64) -> None:
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        self.host, self.port = host, int(port or 80)
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = (
            asyncio.Queue()
        )
        for _ in range(connections):
            self._idle.put_nowait(None)  # opened on first use

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> Answer:
        """One request; a connection that fails is replaced and the request sent once more."""
        conn = await self._idle.get()
        try:
            for attempt in (1, 2):
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(self.host, self.port)
                    answer, keep = await self._exchange(conn, method, path, headers, body)
                    if not keep:
                        conn[1].close()
                        conn = None
                    return answer
                except (ConnectionError, asyncio.IncompleteReadError, OSError):
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        except asyncio.CancelledError:  # a timeout mid-exchange: its answer may still come
            if conn is not None:
                conn[1].close()
            conn = None
            raise
        finally:
            self._idle.put_nowait(conn)

    async def _exchange(
        self,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
    ) -> tuple[Answer, bool]:
        reader, writer = conn
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        started = time.perf_counter()
        writer.write(head.encode() + body)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        raw = await reader.readuntil(b"\r\n\r\n")
        got: dict[str, str] = {}
        for line in raw.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                got[name.strip().lower()] = value.strip()
        data = await reader.readexactly(int(got.get("content-length", "0")))
        answer = Answer(int(status_line.split()[1]), got, data, time.perf_counter() - started)
        return answer, got.get("connection", "").lower() != "close"

    async def close(self) -> None:
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                conn[1].close()
