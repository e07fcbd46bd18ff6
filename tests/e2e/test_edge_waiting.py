"""Waiting behind the writer, end to end: "n ahead of you" and everyone told when it is gone.

The writer (the pipeline's processor) is paused with SIGSTOP, so intents wait for real; the
numbers are checked against the offsets the 202s' receipts name, and the audit then
recomputes every progress fact from the topics.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from flashsale.sale_audit import audit_sale
from tests.e2e.harness import EdgeUnderTest, next_event, sse_events, start_edge, wait_for
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def every_event(pipeline: Pipeline) -> Iterator[EdgeUnderTest]:
    """One app server whose sales get a progress fact after every event."""
    e = start_edge(pipeline, servers=1, FLASHSALE_PROGRESS_EVERY="1")
    yield e
    e.edge.down()


def _offset(status_url: str) -> int:
    """The input offset the 202's receipt names (``receipt=<mac>.<partition>.<time>.<offset>``)."""
    return int(status_url.rsplit(".", 1)[1])


def test_waiting_intents_see_how_many_are_ahead_and_all_hear_when_it_is_sold_out(
    every_event: EdgeUnderTest, uid: str
) -> None:
    edge, sale = every_event, f"wait-{uid}"
    with httpx.Client(timeout=15) as client:
        edge.open_sale(client, sale, [{"sku": "w1", "allocation": 2, "per_user_limit": 1,
                                       "per_order_max": 1}])  # fmt: skip

        def post(user: str) -> str:
            resp = client.post(f"{edge.url}/v1/sales/{sale}/intents", json={"sku": "w1",
                               "quantity": 1}, headers=edge.auth(user))  # fmt: skip
            assert resp.status_code == 202, resp.text
            return str(resp.json()["status_url"])

        def status(user: str, url: str) -> dict:
            return dict(client.get(edge.url + url, headers=edge.auth(user)).json())

        first = post(f"a-{uid}")
        assert wait_for(lambda: status(f"a-{uid}", first)["status"] == "accepted", 30)
        pid = edge.pipeline.processor.pid()
        assert pid is not None
        users = [f"b-{uid}", f"c-{uid}", f"d-{uid}"]
        streams = [sse_events(edge.url + "/v1/me/events", edge.auth(u)) for u in users]
        queues = [s.__enter__() for s in streams]
        os.kill(pid, signal.SIGSTOP)  # the writer stops deciding: the next intents wait
        try:
            urls = [post(u) for u in users]
            for user, url in zip(users, urls, strict=True):
                waiting = status(user, url)
                assert waiting["status"] == "queued", waiting
                # Everything between the first intent (its progress fact) and this one.
                assert waiting["ahead"] == _offset(url) - _offset(first) - 1, (waiting, url)
                assert waiting["sold_out"] is False
            assert status(users[2], urls[2])["ahead"] >= 2
        finally:
            os.kill(pid, signal.SIGCONT)
        try:
            expect = zip(queues, (1, 2, 2), strict=True)
            told = [[next_event(q, 60) for _ in range(n)] for q, n in expect]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    # b took the last unit; c and d were still waiting then: each heard "sold out" before
    # its own rejection.
    assert [e and e["status"] for e in told[0]] == ["accepted"]
    for events in told[1:]:
        assert [e and e["status"] for e in events] == ["queued", "rejected"], events
        assert events[0]["sold_out"] is True and events[1]["reason"] == "SOLD_OUT"
    time.sleep(0.5)
    names = edge.pipeline.names
    verdict = audit_sale(edge.pipeline.endpoints.bootstrap, names, sale, timeout=30)
    assert verdict.passed, verdict.violations
