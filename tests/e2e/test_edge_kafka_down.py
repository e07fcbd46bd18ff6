"""Kafka goes away under load: never a 202 without an ack, 503 + Retry-After meanwhile.

A private broker (own ports and state dir) and a private app server; the shared Postgres.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from flashsale.settings import Settings
from flashsale.topics import TopicNames, catalogue
from infra import provision
from infra.edge import AppServer
from infra.kafka import LocalKafka
from infra.stack import Endpoints
from tests.e2e.harness import SECRET, EdgeUnderTest, free_port, purchase_intents, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.destructive]


def test_no_202_without_an_ack_while_kafka_is_down(
    settings: Settings, endpoints: Endpoints, private_broker: LocalKafka, uid: str
):
    broker = private_broker
    ns = f"kd-{uid}"
    s = dataclasses.replace(settings, namespace=ns, state_dir=settings.state_dir / "test" / ns)
    provision.ensure_topics(broker.bootstrap, catalogue(s))
    sale = f"down-{uid}"
    now = datetime.now(UTC)
    # No processor here: the sale's projection rows are written directly (test-unique ids).
    with psycopg.connect(endpoints.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sales VALUES (%s, 'k1', 1000000, 1000000, 5, %s, %s, false, 'test')",
            (sale, now - timedelta(minutes=1), now + timedelta(hours=1)),
        )
        conn.execute(
            "INSERT INTO sale_counters (sale_id, sku, remaining) VALUES (%s, 'k1', 1000000)",
            (sale,),
        )
    server = AppServer(s, free_port(), {
        "FLASHSALE_INFRA": "external", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "DATABASE_URL": endpoints.dsn, "FLASHSALE_JWT_SECRET": SECRET,
        "FLASHSALE_KAFKA_ACK_TIMEOUT_MS": "1500", "FLASHSALE_RATE_PER_S": "100000",
        "FLASHSALE_RATE_BURST": "100000",
    })  # fmt: skip
    server.start()
    results: list[tuple[float, float, int, str | None, str | None]] = []
    stop = threading.Event()

    def post_continuously(worker: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                i += 1
                sent = time.monotonic()
                headers = {**EdgeUnderTest.auth(f"w{worker}"), "Idempotency-Key": f"{worker}-{i}"}
                try:
                    r = client.post(f"{server.url}/v1/sales/{sale}/intents",
                                    json={"sku": "k1", "quantity": 1}, headers=headers)  # fmt: skip
                except httpx.HTTPError:
                    continue
                body = r.json()
                results.append((sent, time.monotonic(), r.status_code, body.get("intent_id"),
                                r.headers.get("retry-after")))  # fmt: skip
                time.sleep(0.02)

    workers = [threading.Thread(target=post_continuously, args=(w,)) for w in range(4)]
    try:
        for w in workers:
            w.start()
        time.sleep(2)
        broker.stop()
        down_from = time.monotonic()
        time.sleep(5)
        down_until = time.monotonic()
        broker.start()
        restarted = time.monotonic()
        recovered = wait_for(
            lambda: any(r[2] == 202 and r[0] > restarted for r in list(results)), 30
        )
    finally:
        stop.set()
        for w in workers:
            w.join(15)
        server.stop()
        with psycopg.connect(endpoints.dsn, autocommit=True) as conn:
            for table in ("sales", "sale_counters"):
                conn.execute(f"DELETE FROM {table} WHERE sale_id = %s", (sale,))

    before = [r for r in results if r[1] < down_from]
    during = [r for r in results if r[0] >= down_from and r[1] <= down_until]
    after = [r for r in results if r[0] > down_until]
    assert any(r[2] == 202 for r in before), "nothing was accepted before the outage"
    assert during, "no request was answered during the outage"
    assert all(r[2] != 202 for r in during), "a 202 while Kafka was down"
    unavailable = [r for r in during if r[2] == 503]
    assert unavailable and all(int(r[4] or 0) >= 1 for r in unavailable)
    assert {r[2] for r in results} <= {202, 503}
    assert recovered, "no 202 within 30 s of the broker's restart"
    print(f"before={len(before)} during={len(during)} after={len(after)} 503s={len(unavailable)}")

    acked = {r[3] for r in results if r[2] == 202}
    in_topic = {rec["intent_id"] for rec in purchase_intents(
        broker.bootstrap, TopicNames.of(s).sku_commands, sale)}  # fmt: skip
    assert acked <= in_topic, f"{len(acked - in_topic)} intents answered 202 are not in Kafka"
