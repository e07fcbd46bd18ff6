"""Drive a planned crowd through the HTTP edge (nginx) with real bearer tokens."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from producers.crowd import PlannedIntent


@dataclass
class CrowdResult:
    """What the edge answered."""

    queued: dict[str, str] = field(default_factory=dict)  # idempotency key -> intent id
    statuses: Counter[int] = field(default_factory=Counter)
    edge_rejections: Counter[str] = field(default_factory=Counter)  # error code -> count
    retried_after_429_or_503: int = 0
    seconds: float = 0.0


async def _post_all(
    url: str,
    sale_id: str,
    plan: list[PlannedIntent],
    tokens: dict[str, str],
    concurrency: int,
    result: CrowdResult,
) -> None:
    queue: asyncio.Queue[PlannedIntent] = asyncio.Queue()
    for p in plan:
        queue.put_nowait(p)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                headers = {
                    "Authorization": "Bearer " + tokens[p.user_id],
                    "Idempotency-Key": f"{p.user_id}-{p.idempotency_key}",
                }
                body = {"sku": p.sku, "quantity": p.quantity}
                for _attempt in range(20):
                    resp = await client.post(
                        f"/v1/sales/{sale_id}/intents", json=body, headers=headers
                    )
                    if resp.status_code in (429, 503):
                        # Same key again: the retry can never become a second intent.
                        result.retried_after_429_or_503 += 1
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    break
                result.statuses[resp.status_code] += 1
                if resp.status_code == 202:
                    result.queued[headers["Idempotency-Key"]] = resp.json()["intent_id"]
                else:
                    code = resp.json().get("error", {}).get("code", str(resp.status_code))
                    result.edge_rejections[code] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def drive_crowd(
    url: str,
    sale_id: str,
    plan: list[PlannedIntent],
    tokens: dict[str, str],
    concurrency: int = 64,
) -> CrowdResult:
    """POST every planned intent through the edge; retries reuse their idempotency key."""
    result = CrowdResult()
    t0 = time.monotonic()
    asyncio.run(_post_all(url, sale_id, plan, tokens, concurrency, result))
    result.seconds = time.monotonic() - t0
    return result
