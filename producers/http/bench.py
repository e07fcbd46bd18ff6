"""The edge under load, through nginx, side by side in one run (``flashsale bench --only http``).

1. max 202/s (wrk, closed loop) while the writer and the projector decide and project the
   same intents (``busy``), and with them stopped (``writer_idle``);
2. latency at an open-loop offered rate (2,000/s; a generator that does not wait for answers),
   busy and with the writer idle;
3. GET /v1/intents/{id} requests/s (each user reading its own intent);
4. the same max-load run against two other app-server builds behind the same nginx
   configuration: the FastAPI route (``FLASHSALE_HTTP_LEAN_INTENTS=0``, what the edge was)
   and an empty ASGI app (``FLASHSALE_HTTP_EMPTY=1``: the ceiling of nginx + uvicorn here);
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
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from flashsale.settings import Settings
from infra.edge import Edge
from infra.kafka import LocalKafka
from infra.postgres import LocalPostgres
from infra.processes import find_binary
from infra.services import all_services
from producers.http.auth import load_secret, token
from producers.http.config import EdgeSettings
from producers.loadgen import RawClient

_TICK = os.sysconf("SC_CLK_TCK")

_WRK_LUA = """
local tokens = {%(tokens)s}
local counter = 0
wrk.method = "POST"
wrk.body = '{"sku": "%(sku)s", "quantity": 1}'
function setup(thread)
  thread:set("id", tostring(math.random(1, 1e9)))
end
function request()
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[(counter %% #tokens) + 1],
    ["Idempotency-Key"] = id .. "-" .. counter,
  }
  return wrk.format(nil, "%(path)s", headers)
end
"""


_WRK_GET_LUA = """
local pairs_ = {%(pairs)s}
local counter = 0
function request()
  counter = counter + 1
  local p = pairs_[(counter %% #pairs_) + 1]
  return wrk.format("GET", p[2], {["Authorization"] = "Bearer " .. p[1]})
end
"""


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (FileNotFoundError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _CpuMeter:
    """CPU share (1.0 = one core) of named process groups between start() and stop().

    Counted per process present at both ends (a service stopped meanwhile counts 0)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[int, int | None] = {}
        self._t0 = 0.0

    def _ticks(self) -> dict[int, int | None]:
        return {p: _cpu_ticks(p) for pids in self.groups.values() for p in pids}

    def start(self) -> None:
        self._t0, self._start = time.monotonic(), self._ticks()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        end = self._ticks()
        out = {}
        for name, pids in self.groups.items():
            used = 0
            for p in pids:
                a, b = self._start.get(p), end.get(p)
                if a is not None and b is not None:  # present at both ends (0 ticks counts)
                    used += b - a
            out[name] = round(used / _TICK / wall, 3) if wall > 0 else 0.0
        return out


def _open_sale(url: str, secret: str, sale: str) -> None:
    admin = {"Authorization": "Bearer " + token("bench-admin", "admin", 600, secret)}
    body = {
        "sale_id": sale,
        "skus": [{"sku": "b1", "allocation": 2_000_000_000, "per_user_limit": 2_000_000_000,
                  "per_order_max": 1}],
        "starts_in_s": -1,
        "duration_s": 3600,
    }  # fmt: skip
    with httpx.Client(timeout=15) as client:
        resp = client.post(url + "/v1/admin/sales", json=body, headers=admin)
        resp.raise_for_status()
        deadline = time.monotonic() + 60
        while client.get(f"{url}/v1/sales/{sale}").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sale {sale} was not projected in 60 s: is the projector up?")
            time.sleep(0.2)


def _post_script(tokens: list[str], path: str) -> str:
    return _WRK_LUA % {"tokens": ",".join(f'"{t}"' for t in tokens), "sku": "b1", "path": path}


def _get_script(pairs: list[tuple[str, str]]) -> str:
    rows = ",".join(f'{{"{t}", "{p}"}}' for t, p in pairs)
    return _WRK_GET_LUA % {"pairs": rows}


def _run_wrk(url: str, script: str, duration_s: int, conns: int) -> dict[str, Any]:
    wrk = find_binary("wrk", "FLASHSALE_WRK", "apt-get install -y wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    proc = subprocess.Popen(
        [
            wrk,
            "-t2",
            f"-c{conns}",
            f"-d{duration_s}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            f.name,
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return {"proc": proc, "script": f.name}


def _ms(text: str) -> float:
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    return round(float(m.group(1)) * units[m.group(2)], 2) if m else 0.0


def _wrk_result(out: str, duration_s: float) -> dict[str, Any]:
    """wrk's summary; 2xx = total - non-2xx (every 2xx of the intents route is a 202)."""

    def grab(pattern: str) -> str:
        m = re.search(pattern, out, re.MULTILINE)
        return m.group(1) if m else "0"

    total = int(grab(r"(\d+) requests in"))
    non_2xx = int(grab(r"Non-2xx or 3xx responses: (\d+)"))
    return {
        "requests_per_s": float(grab(r"Requests/sec:\s+([\d.]+)")),
        "accepted_2xx": total - non_2xx,
        "accepted_2xx_per_s": round((total - non_2xx) / duration_s, 1),
        "non_2xx": non_2xx,
        # Anchored: "Latency ... 72.50%" on the thread-stats line also ends in "50%".
        "p50_ms": _ms(grab(r"^\s+50%\s+(\S+)")),
        "p99_ms": _ms(grab(r"^\s+99%\s+(\S+)")),
    }


async def _paced(url: str, path: str, tokens: list[str], rate: int, seconds: float) -> dict:
    """Open-loop load at ``rate``/s: each request is sent at its scheduled time whether or
    not earlier ones were answered; latency counts from the scheduled time."""
    client = RawClient(url, 512)
    latencies: list[float] = []
    codes: dict[int, int] = {}
    run = uuid.uuid4().hex[:8]
    body = b'{"sku": "b1", "quantity": 1}'

    async def one(i: int, scheduled: float) -> None:
        headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}",
                   "Idempotency-Key": f"{run}-{i}", "Content-Type": "application/json"}  # fmt: skip
        answer = await client.request("POST", path, headers, body)
        codes[answer.status] = codes.get(answer.status, 0) + 1
        if answer.status == 202:
            latencies.append(time.perf_counter() - scheduled)

    start = time.perf_counter()
    tasks = []
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - start
    await client.close()
    return {
        "offered_per_s": rate,
        "achieved_202_per_s": round(len(latencies) / elapsed, 1),
        "statuses": codes,
        "p50_ms": _pct(latencies, 0.50),
        "p99_ms": _pct(latencies, 0.99),
    }


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 2)


def _groups(settings: Settings, edge: Edge) -> dict[str, list[int]]:
    kafka = LocalKafka(settings.state_dir, settings.kafka_port, settings.kafka_controller_port)
    postgres_pid = LocalPostgres(settings.state_dir, settings.pg_port).pid()
    nginx_pid = edge.nginx.pid() or 0
    return {
        "nginx": [nginx_pid, *_children(nginx_pid)],
        "app_servers": [p for p in (s.pid() for s in edge.servers) if p],
        "broker": [p for p in [kafka.pid()] if p],
        # The rest of the pipeline shares the same two cores while the edge is loaded.
        **{s.name: [p for p in [s.pid()] if p] for s in all_services(settings)},
        "postgres": [p for p in [postgres_pid] if p] + _children(postgres_pid or 0),
    }


def _per_unit(cpu: dict[str, float], units_per_s: float) -> dict[str, Any]:
    """CPU shares (1.0 = one core) as µs per unit of work, and their total."""
    if units_per_s <= 0:
        return {}
    out = {k: round(v / units_per_s * 1e6) for k, v in cpu.items()}
    out["total"] = sum(out.values())
    return out


def _max_load(
    url: str, script: str, groups: dict[str, list[int]], duration_s: int, connections: int
) -> dict[str, Any]:
    """wrk for ``duration_s`` with ``script``; throughput, latency and CPU per 2xx."""
    meter = _CpuMeter(groups)
    meter.start()
    started = _run_wrk(url, script, duration_s, connections)
    proc = started["proc"]
    out = proc.stdout.read() if proc.stdout else ""
    # wrk is gone by the time we could read its /proc entry: take its rusage when reaping.
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    cpu = meter.stop()
    cpu["load_generator"] = round((usage.ru_utime + usage.ru_stime) / duration_s, 3)
    os.unlink(started["script"])
    figures = _wrk_result(out, duration_s)
    return {**figures, "connections": connections, "cpu_share": cpu,
            "cpu_us_per_2xx": _per_unit(cpu, figures["accepted_2xx_per_s"])}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _variant(settings: Settings, name: str, env: dict[str, str]) -> Iterator[Edge]:
    """Another build of the app servers behind the same nginx configuration, on free ports."""
    state = settings.state_dir / "bench" / name
    shutil.rmtree(state, ignore_errors=True)
    variant = Edge(
        dataclasses.replace(settings, state_dir=state, http_port=_free_port()),
        server_ports=[_free_port() for _ in range(2)],
        env=env,
    )
    variant.up()
    try:
        yield variant
    finally:
        variant.down()


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
    secret = load_secret(edge.settings.state_dir, EdgeSettings.from_env().jwt_secret)
    sale = f"bench-{uuid.uuid4().hex[:8]}"
    _open_sale(url, secret, sale)
    tokens = [token(f"bench-{i}", "shopper", 3600, secret) for i in range(users)]
    post = _post_script(tokens, f"/v1/sales/{sale}/intents")
    groups = _groups(settings, edge)
    out: dict[str, Any] = {"sale_id": sale, "app_servers": len(edge.servers)}

    def open_loop() -> dict[str, Any]:
        meter = _CpuMeter({**groups, "load_generator": [os.getpid()]})
        meter.start()
        fixed = asyncio.run(_paced(url, f"/v1/sales/{sale}/intents", tokens, rate, rate_duration_s))
        fixed["cpu_share"] = meter.stop()
        return fixed

    out["busy"] = _max_load(url, post, groups, duration_s, connections)
    out["open_loop_busy"] = open_loop()
    stopped = [s for s in services if s.stop()]
    try:
        out["writer_idle"] = _max_load(url, post, groups, duration_s, connections)
        out["open_loop_writer_idle"] = open_loop()
    finally:
        for s in stopped:
            s.start()
    out["app_server_rss_mb"] = {f"app-{s.port}": round(_rss_mb(p), 1)
                                for s in edge.servers if (p := s.pid())}  # fmt: skip

    readers = asyncio.run(_own_intents(url, sale, tokens[:2000]))
    out["get_status"] = _max_load(url, _get_script(readers), groups, duration_s, connections)

    variant_env = {"FLASHSALE_JWT_SECRET": secret}
    for name, env in (("fastapi_route", {"FLASHSALE_HTTP_LEAN_INTENTS": "0"}),
                      ("empty_asgi_app", {"FLASHSALE_HTTP_EMPTY": "1"})):  # fmt: skip
        with _variant(settings, name, {**variant_env, **env}) as v:
            out[name] = _max_load(v.url, post, _groups(settings, v), duration_s, connections)
    ceiling = out["empty_asgi_app"]["accepted_2xx_per_s"] or 1
    out["share_of_ceiling"] = {k: round(out[k]["accepted_2xx_per_s"] / ceiling, 3)
                               for k in ("busy", "writer_idle", "fastapi_route")}  # fmt: skip
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
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "probe"})
    try:
        return len(c.list_topics(topic, timeout=10).topics[topic].partitions)
    finally:
        c.close()
