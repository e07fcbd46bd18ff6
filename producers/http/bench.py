"""The edge under load, through nginx, side by side in one run (``flashsale bench --only http``).

1. max 202/s (wrk, closed loop) while the writer and the projector decide and project the
   same intents (``busy``), and with them stopped (``writer_idle``);
2. latency at an open-loop offered rate (2,000/s; a generator that does not wait for answers),
   busy and with the writer idle;
3. GET /v1/intents/{id} requests/s (each user reading its own intent);
4. the same max-load run against three other app-server builds behind the same nginx
   configuration: the FastAPI route (``FLASHSALE_HTTP_LEAN_INTENTS=0``, what the edge was),
   an app that only produces each intent and answers after the ack
   (``FLASHSALE_HTTP_EMPTY=produce``: the floor of a 202 with Kafka from Python) and an empty
   ASGI app (``FLASHSALE_HTTP_EMPTY=1``: the ceiling of nginx + uvicorn here);
5. how fast one app server's live feed reads the decisions topic.

CPU is read from /proc per process group (nginx, app servers, broker, writer, projector,
PostgreSQL, load generator) and reported as µs per 202 (or per request). Each request
carries a unique Idempotency-Key and a token drawn from a pool of users large enough that
the per-user rate limit is not what is measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from flashsale.settings import Settings
from infra.edge import Edge
from infra.kafka_cluster import KafkaCluster
from infra.postgres import LocalPostgres
from infra.processes import children, free_port
from infra.services import all_services
from producers.http.auth import load_secret, token
from producers.http.bench_tools import (
    CpuMeter,
    get_script,
    post_script,
    rss_mb,
    run_wrk,
    wrk_result,
)
from producers.http.config import EdgeSettings
from producers.loadgen import RawClient


def paced(url: str, sale: str, tokens: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop load at ``rate``/s, even gaps (``flashsale load``'s engine): latency of each
    202 from its scheduled time."""
    from producers import load

    plan = load.Plan.make(1, rate, seconds, 0, len(tokens), ["b1"], "uniform")
    tally = load.Tally()
    cpu0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(load.http_run(url, f"/v1/sales/{sale}/intents", tokens, plan, tally))
    return load.summary(plan, tally, time.perf_counter() - t0, time.process_time() - cpu0, "202")


def open_sale(url: str, secret: str, sale: str, allocation: int = 2_000_000_000,
              per_user: int = 2_000_000_000) -> None:  # fmt: skip
    """Open ``sale`` for SKU ``b1`` through the admin API and wait until it is projected."""
    admin = {"Authorization": "Bearer " + token("bench-admin", "admin", 600, secret)}
    body = {
        "sale_id": sale,
        "skus": [{"sku": "b1", "allocation": allocation, "per_user_limit": per_user,
                  "per_order_max": 1}],
        "starts_in_s": -1,
        "duration_s": 3600,
    }  # fmt: skip
    with httpx.Client(timeout=60) as client:
        resp = client.post(url + "/v1/admin/sales", json=body, headers=admin)
        # 504 open_unconfirmed: written, the writer is still behind (a backlog of an earlier
        # run); it is decided in log order, so wait for the projection as for a 201.
        if not (resp.status_code == 504 and "open_unconfirmed" in resp.text):
            resp.raise_for_status()
        deadline = time.monotonic() + 300
        while client.get(f"{url}/v1/sales/{sale}").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sale {sale} was not projected in 300 s: is the projector up?")
            time.sleep(0.2)


def groups_of(settings: Settings, edge: Edge) -> dict[str, list[int]]:
    kafka = KafkaCluster.local(settings.state_dir, settings.kafka_port,
                               settings.kafka_controller_port, settings.kafka_nodes)  # fmt: skip
    postgres_pid = LocalPostgres(settings.state_dir, settings.pg_port).pid()
    nginx_pid = edge.nginx.pid() or 0
    return {
        "nginx": [nginx_pid, *children(nginx_pid)],
        "app_servers": [p for p in (s.pid() for s in edge.servers) if p],
        "broker": kafka.pids(),
        # The rest of the pipeline shares the same two cores while the edge is loaded.
        **{s.name: [p for p in [s.pid()] if p] for s in all_services(settings)},
        "postgres": [p for p in [postgres_pid] if p] + children(postgres_pid or 0),
    }


class LogProbe:
    """What the log says a run did: intents written to the command topic, intents the writer
    committed as decided, and how far the writer and the projector lag at the end. A run whose
    202s were not all new records (answered from a cache) or whose writer fell behind shows it."""

    def __init__(self, settings: Settings) -> None:
        from flashsale.kafka_auth import Consumer
        from flashsale.topics import TopicNames

        names = TopicNames.of(settings)
        ns = settings.namespace
        self._groups = {"writer": (f"{ns}-inventory", names.sku_commands),
                        "projector": (f"{ns}-projector", names.decisions)}  # fmt: skip
        self._consumers = {
            role: Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                            "enable.auto.commit": False, "log_level": 0})
            for role, (group, _) in self._groups.items()
        }  # fmt: skip

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Per role: (sum of the topic's end offsets, sum of the group's committed offsets)."""
        from confluent_kafka import TopicPartition

        out = {}
        for role, (_, topic) in self._groups.items():
            c = self._consumers[role]
            parts = [
                TopicPartition(topic, p)
                for p in c.list_topics(topic, timeout=10).topics[topic].partitions
            ]
            ends = sum(c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts)
            committed = sum(max(0, tp.offset) for tp in c.committed(parts, timeout=10))
            out[role] = (ends, committed)
        return out

    @staticmethod
    def figures(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                seconds: float) -> dict[str, Any]:  # fmt: skip
        written = after["writer"][0] - before["writer"][0]
        decided = after["writer"][1] - before["writer"][1]
        return {
            "intents_written_per_s": round(written / seconds),
            "writer_decided_per_s": round(decided / seconds),
            "writer_lag_at_end": after["writer"][0] - after["writer"][1],
            "projector_lag_at_end": after["projector"][0] - after["projector"][1],
        }

    def close(self) -> None:
        for c in self._consumers.values():
            c.close()


def per_unit(cpu: dict[str, float], units_per_s: float) -> dict[str, Any]:
    """CPU shares (1.0 = one core) as µs per unit of work, and their total."""
    if units_per_s <= 0:
        return {}
    out = {k: round(v / units_per_s * 1e6) for k, v in cpu.items()}
    out["total"] = sum(out.values())
    return out


def max_load(
    url: str,
    script: str,
    groups: dict[str, list[int]],
    duration_s: int,
    connections: int,
    log: LogProbe | None = None,
) -> dict[str, Any]:
    """wrk for ``duration_s`` with ``script``; throughput, latency and CPU per 2xx (and, with
    ``log``, what the log says the run wrote and decided)."""
    before = log.snapshot() if log else None
    meter = CpuMeter(groups)
    meter.start()
    started = run_wrk(url, script, duration_s, connections)
    proc = started["proc"]
    out = proc.stdout.read() if proc.stdout else ""
    # wrk is gone by the time we could read its /proc entry: take its rusage when reaping.
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    cpu = meter.stop()
    cpu["load_generator"] = round((usage.ru_utime + usage.ru_stime) / duration_s, 3)
    os.unlink(started["script"])
    figures = wrk_result(out, duration_s)
    if log and before:
        figures["log"] = LogProbe.figures(before, log.snapshot(), duration_s)
    return {**figures, "connections": connections, "cpu_share": cpu,
            "cpu_us_per_2xx": per_unit(cpu, figures["accepted_2xx_per_s"])}  # fmt: skip


@contextmanager
def _variant(settings: Settings, name: str, env: dict[str, str]) -> Iterator[Edge]:
    """Another build of the app servers behind the same nginx configuration, on free ports."""
    state = settings.state_dir / "bench" / name
    shutil.rmtree(state, ignore_errors=True)
    variant = Edge(
        dataclasses.replace(settings, state_dir=state, http_port=free_port()),
        server_ports=[free_port() for _ in range(2)],
        env=env,
    )
    variant.up()  # stops what it started if a server fails to start
    try:
        yield variant
    finally:
        variant.down()
        shutil.rmtree(state, ignore_errors=True)


async def _own_intents(url: str, sale: str, tokens: list[str]) -> list[tuple[str, str]]:
    """One intent per user; (token, status_url) pairs for the reads."""
    client = RawClient(url, 64)
    body = b'{"sku": "b1", "quantity": 1}'

    async def one(t: str) -> tuple[str, str]:
        headers = {"Authorization": f"Bearer {t}", "Content-Type": "application/json"}
        answer = await client.request("POST", f"/v1/sales/{sale}/intents", headers, body)
        return t, json.loads(answer.body)["status_url"]

    pairs = await asyncio.gather(*(one(t) for t in tokens))
    await client.close()
    return list(pairs)


def run_http_bench(
    settings: Settings,
    edge: Edge,
    services: Sequence[Any] = (),
    duration_s: int = 10,
    connections: int = 64,
    rate: int = 2000,
    rate_duration_s: float = 10.0,
    users: int = 5000,
) -> dict[str, Any]:
    """Every figure of the module docstring; ``services`` (writer, projector) are stopped for
    the writer-idle run and started again."""
    if edge.nginx.pid() is None:
        raise RuntimeError("the HTTP edge is not running (start it with the edge's up())")
    url = edge.url
    secret = load_secret(edge.settings.state_dir, EdgeSettings.from_env().jwt_secret).secret
    sale = f"bench-{uuid.uuid4().hex[:8]}"
    open_sale(url, secret, sale)
    tokens = [token(f"bench-{i}", "shopper", 3600, secret) for i in range(users)]
    post = post_script(tokens, f"/v1/sales/{sale}/intents")
    groups = groups_of(settings, edge)
    out: dict[str, Any] = {"sale_id": sale, "app_servers": len(edge.servers)}

    def open_loop() -> dict[str, Any]:
        meter = CpuMeter({**groups, "load_generator": [os.getpid()]})
        meter.start()
        fixed = paced(url, sale, tokens, rate, rate_duration_s)
        fixed["cpu_share"] = meter.stop()
        return fixed

    log = LogProbe(settings)
    out["busy"] = max_load(url, post, groups, duration_s, connections, log)
    out["open_loop_busy"] = open_loop()
    stopped = [s for s in services if s.stop()]
    try:
        out["writer_idle"] = max_load(url, post, groups, duration_s, connections, log)
        out["open_loop_writer_idle"] = open_loop()
    finally:
        for s in stopped:
            s.start()
    out["app_server_rss_mb"] = {f"app-{s.port}": round(rss_mb(p), 1)
                                for s in edge.servers if (p := s.pid())}  # fmt: skip

    readers = asyncio.run(_own_intents(url, sale, tokens[:2000]))
    out["get_status"] = max_load(url, get_script(readers), groups, duration_s, connections)

    variant_env = {"FLASHSALE_JWT_SECRET": secret, "FLASHSALE_BENCH_SALE": sale}
    for name, env in (("fastapi_route", {"FLASHSALE_HTTP_LEAN_INTENTS": "0"}),
                      ("produce_only_app", {"FLASHSALE_HTTP_EMPTY": "produce"}),
                      ("empty_asgi_app", {"FLASHSALE_HTTP_EMPTY": "1"})):  # fmt: skip
        # The floor is compared with the writer-idle run: measured with the writer idle too.
        stopped = [s for s in services if s.stop()] if name == "produce_only_app" else []
        try:
            with _variant(settings, name, {**variant_env, **env}) as v:
                out[name] = max_load(v.url, post, groups_of(settings, v), duration_s,
                                      connections, log)  # fmt: skip
        finally:
            for s in stopped:
                s.start()
    log.close()
    ceiling = out["empty_asgi_app"]["accepted_2xx_per_s"] or 1
    out["share_of_ceiling"] = {k: round(out[k]["accepted_2xx_per_s"] / ceiling, 3)
                               for k in ("busy", "writer_idle", "fastapi_route",
                                         "produce_only_app")}  # fmt: skip
    out["feed_catch_up"] = feed_catch_up(settings)
    out["cpu_note"] = "cpu_share: 1.0 = one core fully busy (the box has 2 cores)"
    return out


def feed_catch_up(settings: Settings, facts: int = 200_000) -> dict[str, Any]:
    """How fast one app server's live feed reads the decisions topic: the last ``facts``
    records (spread over the partitions) applied from a cold start, with its CPU."""
    from flashsale.topics import TopicNames
    from producers.http.livefeed import DecisionFeed
    from schemas.codec import SchemaRegistry

    async def run() -> dict[str, Any]:
        names = TopicNames.of(settings)
        consumer_parts = await asyncio.to_thread(_partition_count, settings, names.decisions)
        feed = DecisionFeed(
            settings.kafka_bootstrap,
            names.decisions,
            SchemaRegistry.load_default(),
            window=max(1, facts // max(1, consumer_parts)),
        )
        cpu0, t0 = time.process_time(), time.monotonic()
        await feed.start()
        seen, idle_since = -1, time.monotonic()
        while time.monotonic() - idle_since < 1.0 and time.monotonic() - t0 < 120:
            if feed.applied != seen:  # the backlog ends where nothing more arrives for 1 s
                seen, idle_since, cpu = feed.applied, time.monotonic(), time.process_time()
            await asyncio.sleep(0.02)
        wall, cpu = idle_since - t0, cpu - cpu0
        await feed.stop()
        n = feed.applied
        return {
            "facts": n,
            "facts_per_s": round(n / wall) if wall else None,
            "cpu_us_per_fact": round(cpu / n * 1e6, 1) if n else None,
        }

    return asyncio.run(run())


def _partition_count(settings: Settings, topic: str) -> int:
    from flashsale.kafka_auth import Consumer

    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "probe"})
    try:
        return len(c.list_topics(topic, timeout=10).topics[topic].partitions)
    finally:
        c.close()
