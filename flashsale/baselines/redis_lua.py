"""The "seckill" design: Redis checks and decrements the stock atomically in a Lua script and
enqueues the order on a stream; a worker writes orders to a database later.

One script call per intent: the user's count against the per-user limit, the stock, then
DECRBY, HINCRBY and XADD of the order. Redis runs scripts one at a time, so this never
oversells *inside Redis*. What the design gives up: the answer comes before the order is in
any database (the stream is drained later, asynchronously), and what Redis loses in a crash
(with ``appendfsync everysec``, up to about a second of answered purchases: stock, counts and
queued orders roll back while the buyers were told yes; with ``always``, each write is
fsynced before the answer, at a large cost) is gone from the only copy. Clients are
redis-benchmark's (Redis's own C client): the server is measured, not a Python driver.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from infra.processes import cpu_seconds
from infra.redis import LocalRedis, redis_binary

# KEYS: stock, per-user counts (hash), order stream. ARGV: user, quantity, per-user limit.
BUY = """
local left = tonumber(redis.call('GET', KEYS[1]) or '-1')
local qty = tonumber(ARGV[2])
if left < 0 then return 'UNKNOWN_SKU' end
if left < qty then return 'SOLD_OUT' end
local had = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if had + qty > tonumber(ARGV[3]) then return 'LIMIT_REACHED' end
redis.call('DECRBY', KEYS[1], qty)
redis.call('HINCRBY', KEYS[2], ARGV[1], qty)
redis.call('XADD', KEYS[3], '*', 'user', ARGV[1], 'qty', qty)
return 'ACCEPTED'
"""


def run(
    home: Path,
    port: int,
    appendfsync: str,
    intents: int = 200_000,
    clients: int = 50,
    users: int = 20_000,
    allocation: int = 2_000_000_000,
    per_user: int = 2_000_000_000,
) -> dict[str, Any]:
    """``intents`` script calls for one hot SKU from ``clients`` connections on a fresh
    redis-server: decisions/s, latency, CPU per 1,000 decisions and what Redis says was sold."""
    redis = LocalRedis(home, port, appendfsync)
    redis.start()
    try:
        redis.cli("SET", "stock:hot", str(allocation))
        sha = redis.cli("SCRIPT", "LOAD", BUY)
        # -r: __rand_int__ becomes a random user id below ``users`` on every call.
        argv = [redis_binary("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port),
                "-c", str(clients), "-n", str(intents), "-r", str(users), "--csv",
                "EVALSHA", sha, "3", "stock:hot", "buyers:hot", "orders:hot",
                "__rand_int__", "1", str(per_user)]  # fmt: skip
        server0 = cpu_seconds(redis.pid())
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = (proc.stdout.read() if proc.stdout else b"").decode()
        _, status, usage = os.wait4(proc.pid, 0)
        server = cpu_seconds(redis.pid()) - server0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"redis-benchmark failed:\n{out}")
        row = [line for line in out.splitlines() if line.startswith('"EVALSHA')]
        if not row:
            raise RuntimeError(f"redis-benchmark printed no result:\n{out}")
        values = [v.strip('"') for v in row[-1].split('","')]
        rps, p50, p99 = float(values[1]), float(values[4]), float(values[6])
        left = int(redis.cli("GET", "stock:hot"))
        queued = int(redis.cli("XLEN", "orders:hot"))
        sold = allocation - left
        over_limit = sum(
            1 for v in redis.cli("HVALS", "buyers:hot").split() if v and int(v) > per_user
        )
        client = usage.ru_utime + usage.ru_stime
        return {
            "appendfsync": appendfsync,
            "clients": clients,
            "decisions": intents,
            "decisions_per_s": round(rps),
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "cpu_ms_per_1000": round(server / intents * 1e6, 1),
            "client_cpu_ms_per_1000": round(client / intents * 1e6, 1),
            # Sold = the orders on the stream (one unit each), not the counter the script
            # itself guards; the stock must agree with them.
            "units_sold": queued,
            "stock_agrees_with_orders": sold == queued,
            "allocation": allocation,
            "oversold": max(0, queued - allocation),
            "users_over_limit": over_limit,
        }
    finally:
        redis.stop()
