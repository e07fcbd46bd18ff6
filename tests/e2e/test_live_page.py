"""The live sale page in headless Chromium (Debian's `chromium`, installed by set-up).

A sale runs through nginx, the analytics service projects it, and Chromium loads the page
from an app server's own port, runs its script (uPlot, polling ``/data``) and hands back
the DOM. The charts' data points (the page writes the exact arrays it gave uPlot into
``#chart-data``) must equal what the test reads from the analytics projection itself.
A screenshot is kept for people: ``<state>/test/screenshots/live-page.png``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import httpx
import psycopg

from infra.services import Service
from projections import analytics
from projections.analytics_rows import LATENCY_BUCKETS_MS, percentile
from projections.catch_up import wait_until_projected
from projections.commands import live_name as outcomes_name
from tests.e2e.harness import EdgeUnderTest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


def _chromium(url: str, *args: str) -> str:
    browser = shutil.which("chromium")
    assert browser, "chromium is missing: `make setup` installs it (as root)"
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1000",
             "--virtual-time-budget=5000", *args, url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _projected(dsn: str, sale: str) -> dict[int, tuple[int, int, int, int]]:
    """Per second: received, decided (accepted or rejected), accepted, rejected (summed over
    SKUs), from the table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM at)::bigint, sum(received),"
            " sum(accepted + rejected), sum(accepted),"
            " sum(rejected) FROM analytics_seconds WHERE sale_id = %s GROUP BY at",
            (sale,),
        ).fetchall()
    return {int(t): (int(a), int(b), int(c), int(d)) for t, a, b, c, d in rows}


def _latency_and_stock(
    dsn: str, sale: str
) -> tuple[dict[int, list[int]], dict[str, dict[int, int]]]:
    """Per second: the answers' latency buckets summed over SKUs; and per SKU, per second,
    the stock remaining after that second's last fact, from the table."""
    buckets: dict[int, list[int]] = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    stock: dict[str, dict[int, int]] = defaultdict(dict)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for at, sku, latency, left in conn.execute(
            "SELECT extract(epoch FROM at)::bigint, sku, latency_ms, remaining"
            " FROM analytics_seconds WHERE sale_id = %s",
            (sale,),
        ):
            for i, n in enumerate(latency or ()):
                buckets[int(at)][i] += n
            if left is not None:
                stock[sku][int(at)] = left
    return buckets, stock


def test_live_page_charts_the_analytics_projection(edge: EdgeUnderTest, uid: str):
    p = edge.pipeline
    service = Service("analytics", p.settings)
    service.start(p.env)
    sale, skus = f"live-{uid}", [f"live-{uid}-a", f"live-{uid}-b"]
    try:
        with httpx.Client(timeout=15) as client:
            edge.open_sale(client, sale, [{"sku": k, "allocation": 30, "per_user_limit": 1,
                                           "per_order_max": 1} for k in skus])  # fmt: skip
            answers: dict[int, int] = defaultdict(int)
            queued = set()
            for i in range(80):
                resp = client.post(f"{edge.url}/v1/sales/{sale}/intents",
                                   json={"sku": skus[i % 2], "quantity": 1},
                                   headers={**edge.auth(f"lp-{i % 60}"),
                                            "Idempotency-Key": f"lp-{i}"})  # fmt: skip
                answers[resp.status_code] += 1
                if resp.status_code == 202:
                    queued.add(resp.json()["intent_id"])
            assert answers[202] >= 60, dict(answers)
            # The page, its data and its script are for operators: not served through nginx.
            for path in (f"/live/sales/{sale}", f"/live/sales/{sale}/data",
                         "/live/static/uPlot.iife.min.js"):  # fmt: skip
                assert client.get(edge.url + path).status_code == 404, path
        audit = p.audit(sale)
        assert not audit.wait_for(queued, 60), "every intent answered 202 is decided"
        audit.close()
        names = p.names
        for projection, topics in ((analytics.live_name(p.settings),
                                    (names.sku_commands, names.decisions)),
                                   (outcomes_name(p.settings), (names.decisions,))):  # fmt: skip
            wait_until_projected(p.endpoints.bootstrap, p.endpoints.dsn, projection, topics, 60)
        truth = _projected(p.endpoints.dsn, sale)
        assert sum(v[0] for v in truth.values()) == answers[202]
        assert sum(v[1] for v in truth.values()) == answers[202]  # each decided once

        page = f"{edge.edge.servers[0].url}/live/sales/{sale}"
        dom = _chromium(page, "--dump-dom")
        found = re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', dom,
                          re.S)  # fmt: skip
        assert found, dom[-3000:]
        charts = json.loads(found.group(1))
        assert charts.get("sale_id") == sale, "the page never rendered its data"
        t, received, decided = charts["rate"]
        _, accepted, rejected = charts["split"]
        assert t == list(range(min(truth), max(truth) + 1))  # one point per second
        for i, second in enumerate(t):  # quiet seconds are zeros
            assert (received[i], decided[i], accepted[i], rejected[i]) == truth.get(
                second, (0, 0, 0, 0)
            )
        # Latency p50/p99 per second, from the buckets the projection holds for that second
        # (a second with no answer has none).
        latency, stock_at = _latency_and_stock(p.endpoints.dsn, sale)
        lt, p50, p99 = charts["latency"]
        assert lt == t and any(v is not None for v in p99)
        for i, second in enumerate(t):
            b = latency.get(second, [0] * (len(LATENCY_BUCKETS_MS) + 1))
            assert (p50[i], p99[i]) == (percentile(b, 0.5), percentile(b, 0.99)), second
        stock = charts["stock"]
        assert charts["stock_labels"] == [f"remaining {k}" for k in skus]
        for k, series in zip(skus, stock[1:], strict=True):  # carried forward from 30
            known = 30
            for i, second in enumerate(t):
                known = stock_at[k].get(second, known)
                assert series[i] == known, (k, second)
            assert known < 30  # units went
        with psycopg.connect(p.endpoints.dsn, autocommit=True) as conn:
            left = dict(conn.execute("SELECT sku, remaining FROM sale_counters"
                                     " WHERE sale_id = %s", (sale,)).fetchall())  # fmt: skip
        assert [series[-1] for series in stock[1:]] == [left[k] for k in skus]
        assert charts["queue"][1][-1] == 0  # no pre-queue in this sale

        shots = p.settings.state_dir / "test" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / "live-page.png"
        _chromium(page, f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {Path(shot).resolve()}")
    finally:
        service.stop()
        with psycopg.connect(p.endpoints.dsn, autocommit=True) as conn:
            for table in analytics.TABLES:
                conn.execute(f"DELETE FROM {table} WHERE sale_id = %s", (sale,))
            conn.execute("DELETE FROM projection_offsets WHERE projection = %s",
                         (analytics.live_name(p.settings),))  # fmt: skip
