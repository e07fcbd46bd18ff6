"""Measuring tools of the HTTP bench: wrk runs and their summary,
CPU of process groups from /proc."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from infra.processes import cpu_ticks, find_binary

_TICK = os.sysconf("SC_CLK_TCK")

# Keys are "<run>-<thread>-<n>": run_wrk puts a fresh run id in place of __RUN__ each time
# (wrk's math.random is never seeded, so random ids repeated from one run to the next and
# the later runs were answered from the app servers' cache of acknowledged intents).
_WRK_LUA = """
local tokens = {%(tokens)s}
local skus = %(skus)d
local counter = 0
local threads = 0
wrk.method = "POST"
wrk.body = '{"sku": "%(sku)s", "quantity": 1}'
function setup(thread)
  threads = threads + 1
  thread:set("id", "__RUN__-" .. threads)
end
function request()
  counter = counter + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[(counter %% #tokens) + 1],
    ["Idempotency-Key"] = id .. "-" .. counter,
  }
  local body = nil
  if skus > 1 then
    body = '{"sku": "%(sku)s' .. (counter %% skus) .. '", "quantity": 1}'
  end
  return wrk.format(nil, "%(path)s", headers, body)
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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class CpuMeter:
    """CPU share (1.0 = one core) of named process groups between start() and stop().

    Counted per process present at both ends (a service stopped meanwhile counts 0)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[int, int | None] = {}
        self._t0 = 0.0

    def _ticks(self) -> dict[int, int | None]:
        return {p: cpu_ticks(p) for pids in self.groups.values() for p in pids}

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


def post_script(tokens: list[str], path: str, sku: str = "b1", skus: int = 1) -> str:
    """POST an intent per request with the tokens in turn, for SKU ``sku``, or with ``skus``
    > 1 for ``<sku>0`` .. ``<sku><skus - 1>`` in turn."""
    return _WRK_LUA % {"tokens": ",".join(f'"{t}"' for t in tokens), "sku": sku, "skus": skus,
                       "path": path}  # fmt: skip


def get_script(pairs: list[tuple[str, str]]) -> str:
    rows = ",".join(f'{{"{t}", "{p}"}}' for t, p in pairs)
    return _WRK_GET_LUA % {"pairs": rows}


def fresh_keys(script: str) -> str:
    """The wrk script of one run: its Idempotency-Keys are new (a run id of its own)."""
    return script.replace("__RUN__", uuid.uuid4().hex[:12])


def run_wrk(url: str, script: str, duration_s: int, conns: int) -> dict[str, Any]:
    wrk = find_binary("wrk", "FLASHSALE_WRK", "apt-get install -y wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(fresh_keys(script))
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


def wrk_result(out: str, duration_s: float) -> dict[str, Any]:
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
