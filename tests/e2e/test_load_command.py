"""`flashsale load` over HTTP and straight to Kafka writes exactly what it reports, and every
intent it wrote is decided (counted from the topics, not from its own summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import SECRET, EdgeUnderTest, purchase_intents

pytestmark = pytest.mark.slow


def _load(edge: EdgeUnderTest, out: Path, *argv: str) -> dict:
    env = {**os.environ, **edge.pipeline.env,
           "FLASHSALE_NAMESPACE": edge.pipeline.settings.namespace,
           "FLASHSALE_STATE_DIR": str(edge.pipeline.settings.state_dir),
           "FLASHSALE_JWT_SECRET": SECRET}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "flashsale.cli", "load", *argv,
                           "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def test_load_over_http_and_kafka_writes_what_it_reports(edge: EdgeUnderTest, uid, tmp_path):
    sale = f"load-{uid}"
    with httpx.Client(timeout=15) as client:
        edge.open_sale(client, sale, [{"sku": "k1", "allocation": 10_000,
                                       "per_user_limit": 5, "per_order_max": 1}])  # fmt: skip
    # 400 users at 200/s for 1 s: under the edge's per-user limit (5/s), so all are 202.
    http = _load(edge, tmp_path / "http.json", "http", "--url", edge.url, "--sale", sale,
                 "--sku", "k1", "--rate", "200", "--seconds", "1", "--users", "400")  # fmt: skip
    assert http["sent"] == 200  # rate x seconds
    assert http["outcomes"] == {"202": http["sent"]}
    assert http["latency_ms_p50"] > 0 and http["loadgen_cpu_us_per_request"] > 0
    bootstrap, topic = edge.pipeline.endpoints.bootstrap, edge.pipeline.names.sku_commands
    written = purchase_intents(bootstrap, topic, sale)
    assert len(written) == http["sent"] == len({r["intent_id"] for r in written})

    kafka = _load(edge, tmp_path / "kafka.json", "kafka", "--sale", sale, "--sku", "k1",
                  "--burst", "300", "--users", "300")  # fmt: skip
    assert kafka["sent"] == 300 and kafka["outcomes"] == {"acked": 300}
    written = purchase_intents(bootstrap, topic, sale)
    ids = {r["intent_id"] for r in written}
    assert len(written) == len(ids) == http["sent"] + 300
    audit = edge.pipeline.audit(sale)
    try:
        assert not audit.wait_for(ids, 90), "an intent the load wrote was not decided"
        report = audit.report()
        assert report.repeated_decisions == 0 and report.oversold == 0
    finally:
        audit.close()
