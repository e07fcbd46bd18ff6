"""The HTTP edge on real processes: nginx + app servers on free ports over a private pipeline."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Empty, Queue
from typing import Any

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from infra.edge import Edge
from producers.http.auth import token
from schemas.codec import SchemaRegistry, UndecodableRecord
from tests.conftest import free_port
from tests.integration.pipeline import Pipeline

SECRET = "e2e-secret-" + "x" * 40


@dataclass
class EdgeUnderTest:
    """A running edge and the pipeline behind it."""

    pipeline: Pipeline
    edge: Edge

    @property
    def url(self) -> str:
        return self.edge.url

    @staticmethod
    def auth(user: str, role: str = "shopper", ttl: int = 600) -> dict[str, str]:
        return {"Authorization": "Bearer " + token(user, role, ttl, SECRET)}

    def open_sale(
        self, client: httpx.Client, sale: str, skus: list[dict[str, int | str]], **window: Any
    ) -> None:
        """Open a sale through the admin API and wait until the projection shows it."""
        body = {"sale_id": sale, "skus": skus, **(window or {"starts_in_s": -1, "duration_s": 600})}
        resp = client.post(
            self.url + "/v1/admin/sales", json=body, headers=self.auth("adm", "admin")
        )
        assert resp.status_code == 201, resp.text
        self.wait_projected(client, sale, [str(s["sku"]) for s in skus])

    def wait_projected(self, client: httpx.Client, sale: str, skus: list[str]) -> None:
        """Until the projection shows the sale's SKUs: every app server knows it then (the
        201 of its opening comes once the log has it, which the other server's feed may not
        have read yet: an intent sent to it at once could find no sale)."""

        def projected() -> bool:
            found = client.get(f"{self.url}/v1/sales/{sale}").json().get("skus", [])
            return sorted(s["sku"] for s in found) == sorted(skus)

        assert wait_for(projected, 30), f"sale {sale} was not projected in 30 s"


def start_edge(
    pipeline: Pipeline, servers: int = 2, https: bool = False, **env: str
) -> EdgeUnderTest:
    """nginx on a free port (and HTTPS on another, with ``https``) in front of ``servers``
    app servers, state under state_dir/test."""
    uid = f"{pipeline.settings.namespace}-{uuid.uuid4().hex[:6]}"
    state = pipeline.settings.state_dir / "test" / uid
    settings = dataclasses.replace(pipeline.settings, state_dir=state, http_port=free_port(),
                                   https_port=free_port() if https else 0)  # fmt: skip
    full_env = {**pipeline.env, "FLASHSALE_JWT_SECRET": SECRET, **env}
    full_env.pop("FLASHSALE_STATE_DIR", None)
    edge = Edge(settings, server_ports=[free_port() for _ in range(servers)], env=full_env)
    edge.up()
    return EdgeUnderTest(pipeline, edge)


def wait_for(check: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def purchase_intents(bootstrap: str, topic: str, sale_id: str) -> list[dict[str, Any]]:
    """Every PurchaseIntent of sale_id in topic (read from offset 0 to the end)."""
    registry = SchemaRegistry.load_default()
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"e2e-{uuid.uuid4().hex}",
         "enable.auto.commit": False, "log_level": 0}
    )  # fmt: skip
    try:
        parts = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        done = {p for p, end in ends.items() if end == 0}
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len(done) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                if msg.offset() + 1 >= ends[msg.partition()]:
                    done.add(msg.partition())
                try:
                    name, record = registry.decode(msg.value() or b"")
                except UndecodableRecord:
                    continue
                if name == "PurchaseIntent" and record.get("sale_id") == sale_id:
                    found.append(record)
        assert len(done) == len(parts), "could not read the topic to its end"
        return found
    finally:
        consumer.close()


@contextmanager
def sse_events(url: str, headers: dict[str, str]) -> Iterator[Queue[dict[str, Any]]]:
    """Follow an SSE stream in a thread; yields a queue of decoded `intent` events."""
    events: Queue[dict[str, Any]] = Queue()
    subscribed = threading.Event()
    stop = threading.Event()

    def follow() -> None:
        try:
            read()
        except httpx.HTTPError:
            if not stop.is_set():  # the server went away during the test, not after it
                raise

    def read() -> None:
        with (
            httpx.Client(timeout=httpx.Timeout(5, read=60)) as client,
            client.stream("GET", url, headers=headers) as resp,
        ):
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            event: dict[str, str] = {}
            for line in resp.iter_lines():
                if stop.is_set():
                    return
                if line.startswith(": subscribed"):
                    subscribed.set()
                elif line.startswith("data: "):
                    event["data"] = line[6:]
                elif line.startswith("event: "):
                    event["event"] = line[7:]
                elif line.startswith("id: "):
                    event["id"] = line[4:]
                elif line == "" and "data" in event:
                    events.put({"event": event.get("event"), "event_id": event.get("id"),
                                **json.loads(event["data"])})  # fmt: skip
                    event = {}

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert subscribed.wait(10), "the event stream did not start"
    try:
        yield events
    finally:
        stop.set()


def next_event(events: Queue[dict[str, Any]], timeout: float) -> dict[str, Any] | None:
    try:
        return events.get(timeout=timeout)
    except Empty:
        return None
