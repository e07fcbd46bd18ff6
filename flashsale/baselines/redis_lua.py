"""The "seckill" design: Redis checks and decrements the stock atomically in a Lua script and
enqueues the order on a stream; a worker writes orders to a database later.

One script call per intent: the user's count against the per-user limit, the stock, then
DECRBY, HINCRBY and XADD of the order. Redis runs scripts one at a time, so this never
oversells *inside Redis*. What the design gives up: the answer comes before the order is in
any database (the stream is drained later, asynchronously), and what Redis loses in a crash
(with ``appendfsync everysec``, up to about a second of answered purchases: stock, counts and
queued orders roll back while the buyers were told yes; with ``always``, each write is
fsynced before the answer, at a large cost) is gone from the only copy. Throughput is
measured with redis-benchmark's clients (Redis's own C client): the server is measured, not a
Python driver; latency at a set rate with a small open-loop client of our own (below).
"""

from __future__ import annotations

import collections
import os
import selectors
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from infra.processes import PeakMemory, cpu_seconds
from infra.redis import LocalRedis, redis_binary

# No KEYS: the SKU's keys are built from the draw, so one script serves one SKU or many
# (fine on a standalone server; Redis Cluster would want them declared). ARGV: a draw below
# users x skus (user = draw // skus, SKU = draw % skus), SKUs, quantity, per-user limit.
BUY = """
local skus = tonumber(ARGV[2])
local draw = tonumber(ARGV[1])
local sku = draw % skus
local user = math.floor(draw / skus)
local qty = tonumber(ARGV[3])
local left = tonumber(redis.call('GET', 'stock:' .. sku) or '-1')
if left < 0 then return 'UNKNOWN_SKU' end
if left < qty then return 'SOLD_OUT' end
local had = tonumber(redis.call('HGET', 'buyers:' .. sku, user) or '0')
if had + qty > tonumber(ARGV[4]) then return 'LIMIT_REACHED' end
redis.call('DECRBY', 'stock:' .. sku, qty)
redis.call('HINCRBY', 'buyers:' .. sku, user, qty)
redis.call('XADD', 'orders', '*', 'sku', sku, 'user', user, 'qty', qty)
return 'ACCEPTED'
"""

# What the tables say after a run: stock left over all SKUs, and users above the limit.
OUTCOME = """
local left, over = 0, 0
for sku = 0, tonumber(ARGV[1]) - 1 do
  left = left + tonumber(redis.call('GET', 'stock:' .. sku))
  for _, v in ipairs(redis.call('HVALS', 'buyers:' .. sku)) do
    if tonumber(v) > tonumber(ARGV[2]) then over = over + 1 end
  end
end
return {left, over}
"""


def run(
    home: Path,
    port: int,
    appendfsync: str,
    intents: int = 200_000,
    clients: int = 50,
    users: int = 20_000,
    skus: int = 1,
    allocation: int = 2_000_000_000,
    per_user: int = 2_000_000_000,
    rate: int | None = None,
    seed: int = 7,
) -> dict[str, Any]:
    """``intents`` script calls from ``clients`` connections (redis-benchmark) on a fresh
    redis-server: decisions/s, latency, CPU per 1,000 decisions, peak memory and what Redis
    says was sold. With ``rate``, open loop instead: that many calls a second (Poisson
    arrivals, ``seed``) from this process, latency from each call's scheduled time."""
    redis = LocalRedis(home, port, appendfsync)
    redis.start()
    try:
        redis.cli("MSET", *(x for k in range(skus) for x in (f"stock:{k}", str(allocation))))
        sha = redis.cli("SCRIPT", "LOAD", BUY)
        server0 = cpu_seconds(redis.pid())
        with PeakMemory(lambda: [p for p in [redis.pid()] if p]) as memory:
            if rate:
                figures = open_loop(port, sha, rate, intents, users, skus, per_user, seed)
            else:
                figures = _closed_loop(port, sha, clients, intents, users, skus, per_user)
        server = cpu_seconds(redis.pid()) - server0
        left, over_limit = (int(v) for v in redis.cli(
            "EVAL", OUTCOME, "0", str(skus), str(per_user)).split())  # fmt: skip
        queued = int(redis.cli("XLEN", "orders"))
        return {
            "appendfsync": appendfsync,
            "skus": skus,
            "decisions": intents,
            **figures,
            "cpu_ms_per_1000": round(server / intents * 1e6, 1),
            "peak_pss_mb": memory.peak_mb,
            # Sold = the orders on the stream (one unit each), not the counter the script
            # itself guards; the stock must agree with them.
            "units_sold": queued,
            "stock_agrees_with_orders": allocation * skus - left == queued,
            "allocation": allocation * skus,
            "oversold": max(0, queued - allocation) if skus == 1 else None,
            "users_over_limit": over_limit,
        }
    finally:
        redis.stop()


def _closed_loop(port: int, sha: str, clients: int, intents: int, users: int, skus: int,
                 per_user: int) -> dict[str, Any]:  # fmt: skip
    """redis-benchmark (Redis's own C client): the server is measured, not a Python driver.
    ``-r``: __rand_int__ becomes a random draw below users x skus on every call (its draws
    cannot be seeded: Redis 7.0's redis-benchmark has no seed option)."""
    argv = [redis_binary("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port),
            "-c", str(clients), "-n", str(intents), "-r", str(users * skus), "--csv",
            "EVALSHA", sha, "0", "__rand_int__", str(skus), "1", str(per_user)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = (proc.stdout.read() if proc.stdout else b"").decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"redis-benchmark failed:\n{out}")
    row = [line for line in out.splitlines() if line.startswith('"EVALSHA')]
    if not row:
        raise RuntimeError(f"redis-benchmark printed no result:\n{out}")
    values = [v.strip('"') for v in row[-1].split('","')]
    client = usage.ru_utime + usage.ru_stime
    return {"clients": clients, "decisions_per_s": round(float(values[1])),
            "latency_ms_p50": float(values[4]), "latency_ms_p99": float(values[6]),
            "client_cpu_ms_per_1000": round(client / intents * 1e6, 1)}  # fmt: skip


def _command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


def replies(buf: bytearray) -> tuple[list[bytes], int]:
    """Whole RESP replies at the start of ``buf`` (strings, errors, integers): the replies
    and how many bytes they took."""
    out: list[bytes] = []
    pos = 0
    while True:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return out, pos
        kind = buf[pos : pos + 1]
        if kind == b"$":
            size = int(buf[pos + 1 : end])
            if size < 0:
                out.append(b"")
                pos = end + 2
                continue
            if len(buf) < end + 2 + size + 2:
                return out, pos
            out.append(bytes(buf[end + 2 : end + 2 + size]))
            pos = end + 2 + size + 2
        elif kind in (b"+", b"-", b":"):
            out.append(bytes(buf[pos:end]))
            pos = end + 2
        else:
            raise ValueError(f"unexpected RESP reply {bytes(buf[pos:end])!r}")


def open_loop(port: int, sha: str, rate: int, intents: int, users: int, skus: int,
              per_user: int, seed: int, connections: int = 8) -> dict[str, Any]:  # fmt: skip
    """Calls sent at their scheduled times over ``connections`` pipelined connections (one
    thread, non-blocking sockets); each reply's latency from its call's scheduled time."""
    from producers.load import Plan, percentiles

    plan = Plan.make(seed, rate, intents / rate, 0, users, [str(k) for k in range(skus)])
    calls = [_command("EVALSHA", sha, "0", str(u * skus + int(k)), str(skus), "1", str(per_user))
             for u, k in zip(plan.users, plan.skus, strict=True)]  # fmt: skip
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    due: list[collections.deque[float]] = [collections.deque() for _ in socks]
    unsent, unread = [bytearray() for _ in socks], [bytearray() for _ in socks]
    latencies: list[float] = []
    lags: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    cpu0, start, sent = time.process_time(), time.perf_counter(), 0
    try:
        while len(latencies) < len(calls):
            now = time.perf_counter()
            while sent < len(calls) and start + plan.at[sent] <= now:
                c = sent % connections
                unsent[c] += calls[sent]
                due[c].append(start + plan.at[sent])
                lags.append(now - start - plan.at[sent])  # this client behind its schedule
                sent += 1
            for c, s in enumerate(socks):
                if unsent[c]:
                    del unsent[c][: s.send(unsent[c])]
            wait = start + plan.at[sent] - time.perf_counter() if sent < len(calls) else 0.05
            if any(unsent):
                wait = 0.0005
            for key, _ in sel.select(max(0.0, wait)):
                c = key.data
                data = socks[c].recv(1 << 16)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                unread[c] += data
                got, used = replies(unread[c])
                del unread[c][:used]
                done = time.perf_counter()
                for reply in got:
                    latencies.append(done - due[c].popleft())
                    outcomes[reply.decode()] += 1
    finally:
        for s in socks:
            s.close()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    # A client that fell behind its schedule would count its own lag as Redis's latency:
    # how late it sent shows here (p99 well under the latency's means it kept up).
    return {"connections": connections, "offered_per_s": rate,
            "decisions_per_s": round(len(latencies) / wall), **percentiles(latencies),
            "send_lag_ms_p99": percentiles(lags, (99.0,))["latency_ms_p99"],
            "outcomes": dict(outcomes),
            "client_cpu_ms_per_1000": round(cpu / len(calls) * 1e6, 1)}  # fmt: skip
