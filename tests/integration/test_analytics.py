"""The analytics projection against the real stack: a sale decided by the real writer, the
`flashsale analytics` service SIGKILLed mid-backlog and restarted, and every per-second row
compared with counts computed here from the topics themselves (read_committed, offset 0).

Its counts are additive, so a batch projected twice after the kill would show as a double
count, and one skipped as a gap. Then its /metrics, `flashsale top` and `flashsale replay`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, TopicPartition

from flashsale.replay import replay
from flashsale.service_metrics import cards, metrics_dir
from flashsale.settings import REPO_ROOT, Settings
from infra.stack import Endpoints
from producers.commands import SkuAllocation
from projections import analytics
from projections.catch_up import wait_until_projected
from schemas.codec import default_registry
from tests.integration.pipeline import start_pipeline
from tests.integration.test_replay import _env

BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)  # ms, as documented
ANSWERS = ("IntentAccepted", "IntentRejected", "EntryQueued", "Waitlisted", "IntentDeferred")


def _read_all(bootstrap: str, topic: str) -> list[tuple[str, dict[str, Any], int]]:
    """Every committed record of ``topic`` from offset 0: (name, record, log time ms)."""
    registry = default_registry()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "t-analytics-read",
                  "isolation.level": "read_committed", "enable.partition.eof": True,
                  "enable.auto.commit": False, "log_level": 3})  # fmt: skip
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    done: set[int] = set()
    out = []
    while len(done) < len(parts):
        for m in c.consume(1000, 1.0):
            if m.error() is not None:
                if m.error().code() == KafkaError._PARTITION_EOF:
                    done.add(m.partition())
                continue
            name, record = registry.decode(m.value())
            out.append((name, record, m.timestamp()[1]))
    c.close()
    return out


def _expected(commands: list, decisions: list, sale_id: str) -> dict:
    """Per (sku, second): what the analytics rows must say, counted plainly."""
    rows: dict = defaultdict(lambda: {"received": 0, "accepted": 0, "rejected": 0,
                                      "reasons": defaultdict(int), "latency": [0] * 14,
                                      "remaining": (-1, None)})  # fmt: skip
    for name, r, at in commands:
        if name == "PurchaseIntent" and r["sale_id"] == sale_id:
            rows[(r["sku"], at // 1000)]["received"] += 1
    for name, r, at in decisions:
        if r.get("sale_id") != sale_id or "sequence" not in r:
            continue
        row = rows[(r["sku"], at // 1000)]
        if name == "IntentAccepted":
            row["accepted"] += 1
        if name == "IntentRejected":
            row["rejected"] += 1
            row["reasons"][r["reason"]] += 1
        if name in ANSWERS:
            waited = max(at - r["decided_at"], 0)
            over = [b for b in BOUNDS if waited <= b]
            row["latency"][BOUNDS.index(over[0]) if over else len(BOUNDS)] += 1
        left = r["allocation"] if name == "SaleOpened" else r.get("remaining")
        if left is not None and r["sequence"] > row["remaining"][0]:
            row["remaining"] = (r["sequence"], left)
    return {k: (v["received"], v["accepted"], v["rejected"], dict(v["reasons"]), v["latency"],
                v["remaining"][1]) for k, v in rows.items()}  # fmt: skip


def _stored(dsn: str, sale_id: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        got = conn.execute(
            "SELECT sku, extract(epoch FROM at)::bigint, received, accepted, rejected,"
            " rejected_by_reason, latency_ms, remaining FROM analytics_seconds"
            " WHERE sale_id = %s",
            (sale_id,),
        ).fetchall()
    return {(k, s): (a, b, c, d, list(lat), rem) for k, s, a, b, c, d, lat, rem in got}


def _samples(text: str, metric: str, sale_id: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of ``metric`` for ``sale_id`` in a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == metric and s.labels.get("sale") == sale_id]  # fmt: skip


def _by(samples: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, value in samples:
        out[labels[label]] += value
    return dict(out)


def _received(dsn: str, sale_id: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(received), 0) FROM analytics_seconds WHERE sale_id = %s",
            (sale_id,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_analytics_survive_a_sigkill_and_equal_the_log(
    settings: Settings, endpoints: Endpoints, uid: str, tmp_path: Path
):
    p = start_pipeline(settings, endpoints, f"an-{uid}")
    ns, names = p.settings, p.names
    name = analytics.live_name(ns)
    sale_id, skus = f"s-an-{uid}", [f"an-{uid}-a", f"an-{uid}-b"]
    procs: list[subprocess.Popen] = []

    def spawn(tag: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "flashsale.cli", "analytics", "--batch-size", "40"]
        with (tmp_path / f"{tag}.log").open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(ns, endpoints), stdout=out,
                                    stderr=out)  # fmt: skip
        procs.append(proc)
        return proc

    try:
        p.open_sale(sale_id, [SkuAllocation(k, 400, 2, 2) for k in skus])
        producer = p.producer()
        futures, ids = [], set()
        for i in range(3000):
            intent_id, fut = producer.submit_intent(sale_id, skus[i % 2], f"u{i % 700}",
                                                    1 + i % 2, f"k{i}")  # fmt: skip
            futures.append(fut)
            ids.add(intent_id)
        producer.wait(futures)
        audit = p.audit(sale_id)
        assert not audit.wait_for(ids, 120), "the writer did not decide every intent"
        audit.close()

        first = spawn("first")  # a backlog of ~6,000 records in batches of 40
        deadline = time.monotonic() + 60
        while _received(endpoints.dsn, sale_id) < 300:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the analytics service never got going"
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        at_kill = _received(endpoints.dsn, sale_id)
        assert 0 < at_kill < 3000, f"the kill must land mid-backlog ({at_kill})"

        second = spawn("second")
        topics = (names.sku_commands, names.decisions)
        wait_until_projected(endpoints.bootstrap, endpoints.dsn, name, topics, timeout=120)
        expected = _expected(_read_all(endpoints.bootstrap, names.sku_commands),
                             _read_all(endpoints.bootstrap, names.decisions), sale_id)  # fmt: skip
        assert sum(v[0] for v in expected.values()) == 3000
        assert sum(v[1] + v[2] for v in expected.values()) == 3000  # one answer per intent
        assert _stored(endpoints.dsn, sale_id) == expected

        # Its /metrics: the projected totals, and the group's lag on every partition.
        # One card per instance; the SIGKILLed one's was left behind and is not served.
        found = [json.loads(f.read_text()) for f in metrics_dir(ns).glob("analytics-*.json")]
        assert second.pid in [c["pid"] for c in found]
        [card] = [c for c in cards(ns) if c["service"] == "analytics"]
        assert card["pid"] == second.pid
        url = f"http://127.0.0.1:{card['port']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        metric = "flashsale_sale_received_total"
        received = [ln for ln in text.splitlines() if ln.startswith(metric) and sale_id in ln]
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in received) == 3000
        by_reason: dict[str, float] = defaultdict(float)  # counted from the log above
        for reasons in (v[3] for v in expected.values()):
            for reason, n in reasons.items():
                by_reason[reason] += n
        exported = _samples(text, "flashsale_sale_rejected_by_reason_total", sale_id)
        assert by_reason and _by(exported, "reason") == by_reason
        # 3,000 intents from 700 people: 500 sent 4, 200 sent 5.
        people = _by(_samples(text, "flashsale_sale_people", sale_id), "intents")
        assert people == {"4": 500, "5-9": 200}
        lags = [ln for ln in text.splitlines() if ln.startswith("flashsale_consumer_lag{")]
        assert len(lags) == 2 * ns.partitions
        assert "process_resident_memory_bytes" in text

        # `flashsale top` finds the namespace's services and shows the sale.
        top = subprocess.run([sys.executable, "-m", "flashsale.cli", "top", "--once"],
                             cwd=REPO_ROOT, env={**_env(ns, endpoints), "COLUMNS": "200"},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert top.returncode == 0, top.stderr[-2000:]
        for shown in ("analytics", "processor", "projector", sale_id, skus[0], "1,500"):
            assert shown in top.stdout, top.stdout

        # `flashsale replay` rebuilds both projections from offset 0: the same rows.
        result = replay(ns, endpoints.dsn, wait_s=60, progress=False)
        tables = {t.table: t for t in result.tables}
        assert {"analytics_seconds", "analytics_users"} <= set(tables)
        assert result.same, [t for t in result.tables if not t.same]
        assert tables["analytics_users"].replayed_rows == 700
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
        p.stop()
        with psycopg.connect(endpoints.dsn, autocommit=True) as conn:
            for table in analytics.TABLES:
                conn.execute(f"DELETE FROM {table} WHERE sale_id = %s", (sale_id,))
            conn.execute("DELETE FROM projection_offsets WHERE projection = %s", (name,))
