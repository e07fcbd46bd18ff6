"""nginx's per-address limit on posting intents: each client address gets its own bucket,
excess posts are refused 429 at nginx before any app server works; reads are not limited."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from tests.e2e.harness import EdgeUnderTest, start_edge
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.slow


def _posts(edge: EdgeUnderTest, address: str, n: int) -> Counter[int]:
    transport = httpx.HTTPTransport(local_address=address)
    statuses: Counter[int] = Counter()
    with httpx.Client(base_url=edge.url, transport=transport, timeout=10) as client:
        for i in range(n):
            answer = client.post("/v1/sales/no-such-sale/intents",
                                 json={"sku": "s", "quantity": 1},
                                 headers={**edge.auth(f"{address}-u{i}"),
                                          "Idempotency-Key": f"k{i}"})  # fmt: skip
            statuses[answer.status_code] += 1
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "rate_limited"
    return statuses


def test_each_client_address_gets_its_own_bucket_at_nginx(pipeline: Pipeline) -> None:
    edge = start_edge(pipeline, servers=1, FLASHSALE_ADDR_RATE_PER_S="0.2",
                      FLASHSALE_ADDR_RATE_BURST="2")  # fmt: skip
    try:
        # Different users from one address share its bucket: 1 + burst 2 reach the app
        # (which answers 404 unknown_sale), the rest are refused by nginx.
        assert _posts(edge, "127.0.0.2", 8) == {404: 3, 429: 5}
        assert _posts(edge, "127.0.0.3", 4) == {404: 3, 429: 1}  # another address, its own
        with httpx.Client(base_url=edge.url, transport=httpx.HTTPTransport(
                local_address="127.0.0.2"), timeout=10) as client:  # fmt: skip
            reads = [client.get("/v1/sales/no-such-sale").status_code for _ in range(5)]
        assert 429 not in reads  # only posting intents is limited here
    finally:
        edge.edge.down()
