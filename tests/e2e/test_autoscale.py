"""The autoscaler on a running edge: it adds an app server behind nginx (a reload) and, when
it stops, takes it away again (a reload, a drain, SIGTERM), while a client posts intents all
along: every request is answered 202, none is dropped, and both servers answered some. It
adds a writer worker to the group and stops it again the same way."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx

from infra import autoscale, processes
from infra.autoscale_policy import Bounds, Policy
from infra.services import extra_workers
from tests.e2e.harness import EdgeUnderTest, start_edge, wait_for
from tests.integration.pipeline import Pipeline


def test_a_server_is_added_and_removed_behind_nginx_without_dropping_a_request(
    pipeline: Pipeline, uid: str
) -> None:
    under = start_edge(pipeline, servers=1)
    edge = under.edge
    try:
        sale = f"scale-{uid}"
        with httpx.Client(timeout=30) as client:
            terms = {"allocation": 1_000_000, "per_user_limit": 1_000_000, "per_order_max": 1}
            under.open_sale(client, sale, [{"sku": "k1", **terms}])
        statuses: Counter[str] = Counter()
        served: Counter[str] = Counter()
        resent: list[str] = []  # an idle keep-alive connection an old nginx worker closed
        posting = threading.Event()
        posting.set()

        url = f"{under.url}/v1/sales/{sale}/intents"

        def crowd() -> None:
            with httpx.Client(timeout=30) as client:
                n = 0
                while posting.is_set():
                    n += 1
                    headers = {**EdgeUnderTest.auth(f"c{n % 500}-{uid}"),
                               "Idempotency-Key": f"{uid}-{n}"}  # fmt: skip
                    try:
                        resp = client.post(url, json={"sku": "k1", "quantity": 1}, headers=headers)
                    except httpx.TransportError as exc:  # sent again once, with the same key
                        resent.append(type(exc).__name__)
                        try:
                            resp = client.post(url, json={"sku": "k1", "quantity": 1},
                                               headers=headers)  # fmt: skip
                        except httpx.HTTPError as again:
                            statuses[type(again).__name__] += 1
                            continue
                    statuses[str(resp.status_code)] += 1
                    served[resp.headers.get("x-served-by", "?")] += 1

        sender = threading.Thread(target=crowd, daemon=True)
        sender.start()
        stop = threading.Event()
        sizes: list[int] = []
        policy = Policy(servers=Bounds(2, 2), workers=Bounds(1, 1))  # one more server, at once
        scaler = threading.Thread(
            target=autoscale.run, daemon=True,
            args=(pipeline.settings, policy, 0.5, stop, lambda s, _: sizes.append(s.servers)),
            kwargs={"env": edge.servers[0].env, "edge": edge},
        )  # fmt: skip
        scaler.start()
        assert wait_for(lambda: len(served) >= 2, 60), f"one server answered all: {served}"
        added = [p for p in (edge.servers[0].run_dir).glob("app-*.pid")
                 if int(p.stem[4:]) != edge.servers[0].port]  # fmt: skip
        assert len(added) == 1
        pid = processes.read_pid(added[0])
        time.sleep(1)
        stop.set()  # the autoscaler puts the edge back as it found it
        scaler.join(60)
        assert not scaler.is_alive()
        assert pid is not None and not processes.alive(pid), "the added server was left running"
        time.sleep(1.5)  # requests go on through the one server left
        posting.clear()
        sender.join(30)
    finally:
        edge.down()
    assert set(statuses) == {"202"} and statuses["202"] > 50, statuses
    assert len(resent) <= 3, resent  # one per reload at most: the connection, not the request
    assert 2 in sizes
    conf = edge.nginx.conf.read_text()
    assert conf.count("server 127.0.0.1:") == 1  # the upstream as it was found
    record = autoscale.run_dir(pipeline.settings) / autoscale.DECISIONS_FILE
    rows = [json.loads(x) for x in record.read_text().splitlines()]
    assert any(r["kind"] == "servers" and r["to"] == 2 and r["outcome"] == "done" for r in rows)


def test_a_writer_worker_is_added_and_stopped_again(pipeline: Pipeline) -> None:
    under = start_edge(pipeline, servers=1)
    try:
        stop = threading.Event()
        policy = Policy(servers=Bounds(1, 1), workers=Bounds(2, 2))  # one more worker, at once
        scaler = threading.Thread(target=autoscale.run, daemon=True,
                                  args=(pipeline.settings, policy, 0.5, stop),
                                  kwargs={"env": pipeline.env, "edge": under.edge})  # fmt: skip
        scaler.start()

        def running() -> list[int]:
            return [p for w in extra_workers(pipeline.settings) if (p := w.pid()) is not None]

        def decided() -> list[dict]:  # what the live page shows; the other test's are older
            return [r for r in autoscale.recent(pipeline.settings)["decisions"]
                    if r["kind"] == "workers"]  # fmt: skip

        assert wait_for(decided, 60), "no decision was recorded"
        [row] = decided()
        assert (row["kind"], row["to"], row["outcome"]) == ("workers", 2, "done")
        added = running()
        assert len(added) == 1, "no worker was added"
        assert autoscale.recent(pipeline.settings)["now"] is not None
        stop.set()
        scaler.join(60)
        assert not scaler.is_alive()
        assert running() == [] and not any(processes.alive(p) for p in added)
        assert autoscale.recent(pipeline.settings)["now"] is None  # it says it stopped
    finally:
        under.edge.down()
