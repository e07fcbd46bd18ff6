"""Drive a planned crowd through the HTTP edge (nginx) with real bearer tokens (a lean client:
the crowd must not take the CPU of the system it loads)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from producers.crowd import PlannedIntent
from producers.loadgen import Answer, RawClient


@dataclass
class CrowdResult:
    """What the edge answered."""

    queued: dict[str, str] = field(default_factory=dict)  # idempotency key -> intent id
    statuses: Counter[int] = field(default_factory=Counter)
    edge_rejections: Counter[str] = field(default_factory=Counter)  # error code -> count
    retried_after_429_or_503: int = 0
    retried_after_gateway_error: int = 0  # 502/504 or a dropped connection: sent again, same key
    seconds: float = 0.0
    accept_seconds: list[float] = field(default_factory=list)  # each 202's request time
    selling_seconds: float = 0.0  # from the start to the last 202 (units were still left)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


async def _post_all(
    url: str,
    sale_id: str,
    plan: list[PlannedIntent],
    tokens: dict[str, str],
    concurrency: int,
    result: CrowdResult,
    progress: Callable[[CrowdResult], None] | None,
    pace_s: float,
) -> None:
    queue: asyncio.Queue[PlannedIntent] = asyncio.Queue()
    for p in plan:
        queue.put_nowait(p)
    client = RawClient(url, concurrency)
    path = f"/v1/sales/{sale_id}/intents"

    async def worker() -> None:
        while not queue.empty():
            p = queue.get_nowait()
            headers = {
                "Authorization": "Bearer " + tokens[p.user_id],
                "Idempotency-Key": f"{p.user_id}-{p.idempotency_key}",
                "Content-Type": "application/json",
            }
            body = json.dumps({"sku": p.sku, "quantity": p.quantity}).encode()
            for _attempt in range(20):
                try:
                    answer = await client.request("POST", path, headers, body)
                except (ConnectionError, OSError, asyncio.IncompleteReadError):
                    answer = Answer(599, {}, b"", 0.0)  # the edge went away mid-request
                if answer.status in (429, 503):
                    # Same key again: the retry can never become a second intent.
                    result.retried_after_429_or_503 += 1
                    await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
                    continue
                if answer.status in (502, 504, 599):  # an app server died with it in flight
                    result.retried_after_gateway_error += 1
                    await asyncio.sleep(0.2)
                    continue
                break
            result.statuses[answer.status] += 1
            if answer.status == 202:
                result.queued[headers["Idempotency-Key"]] = json.loads(answer.body)["intent_id"]
                result.accept_seconds.append(answer.seconds)
                result.selling_seconds = time.monotonic() - began
            else:
                result.edge_rejections[_code(answer.status, answer.body)] += 1
            if pace_s:
                await asyncio.sleep(pace_s)

    async def report() -> None:
        while True:
            await asyncio.sleep(0.25)
            if progress is not None:
                progress(result)

    began = time.monotonic()
    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        reporter.cancel()
        await client.close()


def _code(status: int, body: bytes) -> str:
    """The error code of an answer (``http_<status>`` when its body is not the API's)."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"


def drive_crowd(
    url: str,
    sale_id: str,
    plan: list[PlannedIntent],
    tokens: dict[str, str],
    concurrency: int = 64,
    progress: Callable[[CrowdResult], None] | None = None,
    pace_s: float = 0.0,
) -> CrowdResult:
    """POST every planned intent through the edge; retries reuse their idempotency key (after
    a 429 or 503, a 502 or 504, or a dropped connection). Each of the ``concurrency`` senders
    waits ``pace_s`` after each answer (a sale that lasts; 0: as fast as the edge answers)."""
    result = CrowdResult()
    t0 = time.monotonic()
    asyncio.run(_post_all(url, sale_id, plan, tokens, concurrency, result, progress, pace_s))
    result.seconds = time.monotonic() - t0
    return result
