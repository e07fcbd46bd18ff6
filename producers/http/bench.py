"""Load through nginx: 202s/s at max load (wrk) and latency at a fixed offered rate.

Needs the edge (nginx + app servers) and the processor/projector of settings' namespace
running: the bench opens its own sale through the admin API and waits until it is projected.
Each request carries a unique Idempotency-Key and a token drawn from a pool of users large
enough that the per-user rate limit is not what is measured.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import tempfile
import time
import uuid
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


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (FileNotFoundError, IndexError):
        return 0


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
    """CPU share (1.0 = one core) of named process groups between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, int] = {}
        self._t0 = 0.0

    def _ticks(self) -> dict[str, int]:
        return {name: sum(_cpu_ticks(p) for p in pids) for name, pids in self.groups.items()}

    def start(self) -> None:
        self._t0, self._start = time.monotonic(), self._ticks()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t0
        end = self._ticks()
        return {
            n: round((end[n] - self._start[n]) / _TICK / wall, 3) for n in self.groups if wall > 0
        }


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


def _run_wrk(url: str, path: str, tokens: list[str], duration_s: int, conns: int) -> dict[str, Any]:
    wrk = find_binary("wrk", "FLASHSALE_WRK", "apt-get install -y wrk")
    script = _WRK_LUA % {
        "tokens": ",".join(f'"{t}"' for t in tokens),
        "sku": "b1",
        "path": path,
    }
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
    """wrk's summary; every 2xx of the intents route is a 202, so 202s = total - non-2xx."""

    def grab(pattern: str) -> str:
        m = re.search(pattern, out, re.MULTILINE)
        return m.group(1) if m else "0"

    total = int(grab(r"(\d+) requests in"))
    non_2xx = int(grab(r"Non-2xx or 3xx responses: (\d+)"))
    return {
        "requests_per_s": float(grab(r"Requests/sec:\s+([\d.]+)")),
        "accepted_202": total - non_2xx,
        "accepted_202_per_s": round((total - non_2xx) / duration_s, 1),
        "non_2xx": non_2xx,
        # Anchored: "Latency ... 72.50%" on the thread-stats line also ends in "50%".
        "p50_ms": _ms(grab(r"^\s+50%\s+(\S+)")),
        "p99_ms": _ms(grab(r"^\s+99%\s+(\S+)")),
    }


async def _paced(url: str, path: str, tokens: list[str], rate: int, seconds: float) -> dict:
    """Open-loop load at ``rate``/s; latency measured from each request's scheduled time.

    A small raw HTTP/1.1 keep-alive client: httpx costs too much CPU per request to offer
    2,000 requests/s from the same 2 cores as the system under test.
    """
    host, port = url.removeprefix("http://").split(":")
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    codes: dict[int, int] = {}
    run = uuid.uuid4().hex[:8]
    body = b'{"sku": "b1", "quantity": 1}'

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while (item := await queue.get()) is not None:
                i, scheduled = item
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                    f"Authorization: Bearer {tokens[i % len(tokens)]}\r\n"
                    f"Idempotency-Key: {run}-{i}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + body)
                status_line = await reader.readline()
                headers = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length: (\d+)", headers)
                await reader.readexactly(int(m.group(1)) if m else 0)
                code = int(status_line.split()[1])
                codes[code] = codes.get(code, 0) + 1
                if code == 202:
                    latencies.append(time.perf_counter() - scheduled)
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(256)]
    start = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((i, scheduled))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "offered_per_s": rate,
        "achieved_202_per_s": round(len(latencies) / elapsed, 1),
        "statuses": codes,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def run_http_bench(
    settings: Settings,
    duration_s: int = 10,
    connections: int = 64,
    rate: int = 2000,
    rate_duration_s: float = 10.0,
    users: int = 5000,
    edge: Edge | None = None,
) -> dict[str, Any]:
    """Drive intents through nginx; return throughput, latency, RSS and CPU shares."""
    edge = edge or Edge(settings)
    if edge.nginx.pid() is None:
        raise RuntimeError("the HTTP edge is not running (start it with the edge's up())")
    url = edge.url
    secret = load_secret(edge.settings.state_dir, EdgeSettings.from_env().jwt_secret)
    sale = f"bench-{uuid.uuid4().hex[:8]}"
    _open_sale(url, secret, sale)
    tokens = [token(f"bench-{i}", "shopper", 3600, secret) for i in range(users)]
    path = f"/v1/sales/{sale}/intents"
    kafka = LocalKafka(settings.state_dir, settings.kafka_port, settings.kafka_controller_port)
    postgres_pid = LocalPostgres(settings.state_dir, settings.pg_port).pid()
    nginx_pid = edge.nginx.pid() or 0
    app_pids = [p for p in (s.pid() for s in edge.servers) if p]
    groups = {
        "nginx": [nginx_pid, *_children(nginx_pid)],
        "app_servers": app_pids,
        "broker": [p for p in [kafka.pid()] if p],
        # The rest of the pipeline shares the same two cores while the edge is loaded.
        **{s.name: [p for p in [s.pid()] if p] for s in all_services(settings)},
        "postgres": [p for p in [postgres_pid] if p] + _children(postgres_pid or 0),
    }

    # 1. Maximum load: wrk, closed loop.
    meter = _CpuMeter(groups)
    meter.start()
    started = _run_wrk(url, path, tokens, duration_s, connections)
    proc = started["proc"]
    out = proc.stdout.read() if proc.stdout else ""
    # wrk is gone by the time we could read its /proc entry: take its rusage when reaping.
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    cpu_max = meter.stop()
    cpu_max["load_generator"] = round((usage.ru_utime + usage.ru_stime) / duration_s, 3)
    os.unlink(started["script"])
    max_load = {**_wrk_result(out, duration_s), "connections": connections, "cpu": cpu_max}
    rss = {f"app-{s.port}": round(_rss_mb(p), 1) for s in edge.servers if (p := s.pid())}

    # 2. Fixed offered rate: paced async client in this process (wrk2 is not packaged).
    groups["load_generator"] = [os.getpid()]
    meter = _CpuMeter(groups)
    meter.start()
    fixed = asyncio.run(_paced(url, path, tokens, rate, rate_duration_s))
    fixed["cpu"] = meter.stop()
    return {
        "sale_id": sale,
        "app_servers": len(edge.servers),
        "max_load": max_load,
        "fixed_rate": fixed,
        "app_server_rss_mb": rss,
        "cpu_note": "CPU share: 1.0 = one core fully busy (the box has 2 cores)",
    }


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
