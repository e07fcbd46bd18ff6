"""The classic design: one PostgreSQL row per SKU, decremented under a row lock.

Each intent is one transaction, as a web handler would run it, in one round trip (the
function ``bl_buy`` below, so the comparison is not about network chatter): lock the SKU's
stock row, check the user's count against the per-user limit, decrement the stock, count the
user's unit and insert the order, or reject. The clients are pgbench's (PostgreSQL's own C
client), so what is measured is the database, not a Python driver. Everything lives in a
scratch schema of the project's PostgreSQL, dropped afterwards.

Durability: with ``synchronous_commit=on`` (PostgreSQL's default) a transaction's answer
comes after its WAL is flushed to disk; with ``off`` up to ~0.6 s of answered transactions
can be lost in a crash (the database stays consistent).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg

from infra.postgres import DB_NAME, DB_PASSWORD, DB_USER, pg_binary
from infra.processes import PeakMemory, children, cpu_seconds

SCHEMA = """
CREATE TABLE bl_stock (sku int PRIMARY KEY, remaining int NOT NULL, per_user int NOT NULL,
                       allocation int NOT NULL);
CREATE TABLE bl_user_counts (sku int, user_id int, bought int NOT NULL,
                             PRIMARY KEY (sku, user_id));
CREATE TABLE bl_orders (order_id bigserial PRIMARY KEY, sku int NOT NULL, user_id int NOT NULL,
                        quantity int NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION bl_buy(p_sku int, p_user int, p_qty int) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  left_ int;
  lim int;
  had int;
BEGIN
  SELECT remaining, per_user INTO left_, lim FROM bl_stock WHERE sku = p_sku FOR UPDATE;
  IF left_ IS NULL THEN RETURN 'UNKNOWN_SKU'; END IF;
  IF left_ < p_qty THEN RETURN 'SOLD_OUT'; END IF;
  SELECT bought INTO had FROM bl_user_counts WHERE sku = p_sku AND user_id = p_user;
  IF coalesce(had, 0) + p_qty > lim THEN RETURN 'LIMIT_REACHED'; END IF;
  UPDATE bl_stock SET remaining = remaining - p_qty WHERE sku = p_sku;
  INSERT INTO bl_user_counts AS c VALUES (p_sku, p_user, p_qty)
    ON CONFLICT (sku, user_id) DO UPDATE SET bought = c.bought + p_qty;
  INSERT INTO bl_orders (sku, user_id, quantity) VALUES (p_sku, p_user, p_qty);
  RETURN 'ACCEPTED';
END $$;
"""

# One intent of a random user (1..users) for a random SKU (0..skus-1), quantity 1.
PGBENCH_SCRIPT = """\\set user random(1, {users})
\\set sku random(0, {last_sku})
SELECT bl_buy(:sku, :user, 1);
"""


def _server_cpu(postmaster: int) -> float:
    """CPU seconds of the postmaster and its backends, the exited ones included (the
    postmaster reaps them: their time is in its children's counters)."""
    return cpu_seconds(postmaster, reaped=True) + sum(cpu_seconds(p) for p in children(postmaster))


class Scratch:
    """The baseline's tables in a schema of their own; ``drop`` removes it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.schema = f"bl_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.schema}")
            try:
                conn.execute(f"SET search_path TO {self.schema}")
                conn.execute(SCHEMA)
            except Exception:
                conn.execute(f"DROP SCHEMA {self.schema} CASCADE")  # never made: not dropped later
                raise

    def stock(self, skus: int, allocation: int, per_user: int) -> None:
        with psycopg.connect(dsn_in(self.dsn, self.schema)) as conn:
            conn.execute("TRUNCATE bl_stock, bl_user_counts, bl_orders")
            with conn.cursor().copy("COPY bl_stock FROM STDIN") as copy:
                for sku in range(skus):
                    copy.write_row((sku, allocation, per_user, allocation))

    def outcome(self) -> dict[str, int]:
        """Units sold, allocated, oversold, and users above their limit, from the tables."""
        with psycopg.connect(dsn_in(self.dsn, self.schema)) as conn:
            sold, allocated, oversold = conn.execute(
                "SELECT coalesce(sum(o.q), 0), sum(s.allocation),"
                " coalesce(sum(greatest(0, coalesce(o.q, 0) - s.allocation)), 0)"
                " FROM bl_stock s LEFT JOIN (SELECT sku, sum(quantity) AS q FROM bl_orders"
                " GROUP BY sku) o USING (sku)"
            ).fetchone() or (0, 0, 0)
            over_limit = conn.execute(
                "SELECT count(*) FROM (SELECT o.sku, o.user_id, sum(o.quantity) AS q"
                " FROM bl_orders o GROUP BY o.sku, o.user_id) u"
                " JOIN bl_stock s USING (sku) WHERE u.q > s.per_user"
            ).fetchone()
        return {
            "units_sold": int(sold),
            "allocation": int(allocated),
            "oversold": int(oversold),
            "users_over_limit": int(over_limit[0]) if over_limit else 0,
        }

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def dsn_in(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"


def run(
    dsn: str,
    port: int,
    postmaster: int,
    clients: int,
    synchronous_commit: bool,
    skus: int = 1,
    users: int = 20_000,
    seconds: int | None = 20,
    intents: int | None = None,
    allocation: int = 2_000_000_000,
    per_user: int = 2_000_000_000,
    rate: int | None = None,
) -> dict[str, Any]:
    """pgbench with ``clients`` connections for ``seconds`` (or ``intents`` in all): decisions/s,
    CPU (server and pgbench) per 1,000 decisions, peak memory of the server, and what the
    tables say was sold. With ``rate``, open loop: pgbench schedules that many transactions a
    second whatever the answers and logs each one's latency from its scheduled start."""
    scratch = Scratch(dsn)
    logs = tempfile.TemporaryDirectory(prefix="pgbench-")
    try:
        scratch.stock(skus, allocation, per_user)
        script = Path(logs.name) / "buy.sql"
        script.write_text(PGBENCH_SCRIPT.format(users=users, last_sku=skus - 1))
        length = (
            ["-T", str(seconds)] if intents is None else ["-t", str(max(1, intents // clients))]
        )
        paced = ["-R", str(rate), "-l", "--log-prefix", f"{logs.name}/tx"] if rate else []
        argv = [pg_binary("pgbench"), "-n", "-c", str(clients), "-j", str(min(clients, 2)),
                "--random-seed", "7", *length, *paced, "-f", str(script), "-h", "127.0.0.1",
                "-p", str(port), "-U", DB_USER, DB_NAME]  # fmt: skip
        options = f"-c search_path={scratch.schema} -c synchronous_commit="
        env = {**os.environ, "PGPASSWORD": DB_PASSWORD,
               "PGOPTIONS": options + ("on" if synchronous_commit else "off")}  # fmt: skip
        server0 = _server_cpu(postmaster)
        with PeakMemory(lambda: [postmaster, *children(postmaster)]) as memory:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env)  # fmt: skip
            out = (proc.stdout.read() if proc.stdout else b"").decode()
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        server = _server_cpu(postmaster) - server0
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed:\n{out}")
        done = int(_grab(r"number of transactions actually processed: (\d+)", out))
        tps = float(_grab(r"tps = ([\d.]+) \(without initial connection time\)", out))
        client = usage.ru_utime + usage.ru_stime
        return {
            "clients": clients,
            "skus": skus,
            "synchronous_commit": "on" if synchronous_commit else "off",
            "decisions": done,
            "decisions_per_s": round(tps),
            "latency_ms_avg": float(_grab(r"latency average = ([\d.]+) ms", out)),
            **(_logged_latency(Path(logs.name)) if rate else {}),
            "cpu_ms_per_1000": round(server / done * 1e6, 1) if done else None,
            "client_cpu_ms_per_1000": round(client / done * 1e6, 1) if done else None,
            "peak_pss_mb": memory.peak_mb,
            **scratch.outcome(),
        }
    finally:
        scratch.drop()
        logs.cleanup()


def _logged_latency(directory: Path) -> dict[str, Any]:
    """p50/p99/p99.9 from pgbench's per-transaction logs (third column: µs from the
    transaction's scheduled start to its end, schedule lag included)."""
    from producers.load import percentiles

    seconds = [int(line.split()[2]) / 1e6
               for f in directory.glob("tx*") for line in f.read_text().splitlines()
               if line and line.split()[2].isdigit()]  # fmt: skip
    return {"latency_samples": len(seconds), **percentiles(seconds)}


def _grab(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"pgbench output without {pattern!r}:\n{text}")
    return m.group(1)
