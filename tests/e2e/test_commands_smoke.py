"""`flashsale demo` and `flashsale bench` run end to end (small sizes), so neither rots.

Both run as a user would run them, against this session's Kafka and PostgreSQL, in their own
namespace (the bench makes one per scenario), so nothing lands in the default namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from flashsale.settings import Settings
from infra.stack import Endpoints
from tests.conftest import free_port, local_only

pytestmark = pytest.mark.slow


def _env(settings: Settings, endpoints: Endpoints, namespace: str) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.bootstrap,
        "DATABASE_URL": endpoints.dsn,
        "FLASHSALE_INFRA": "external",
        "FLASHSALE_NAMESPACE": namespace,
        "FLASHSALE_STATE_DIR": str(settings.state_dir),
        "FLASHSALE_HTTP_PORT": str(free_port()),
    }


def test_demo_runs_a_small_sale_over_http_and_its_audit_holds(
    settings: Settings, endpoints: Endpoints, tmp_path: Path
):
    local_only(settings)
    report = tmp_path / "demo.json"
    argv = ["demo", "--intents", "3000", "--users", "800", "--allocation", "100"]
    # A state directory of its own: its nginx, app servers and keys are the test's, never
    # those of a stack `make up` runs in the default namespace (whose nginx it found before).
    env = {**_env(settings, endpoints, f"t-demo-{uuid.uuid4().hex[:8]}"),
           "FLASHSALE_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "flashsale.cli", *argv, "--report", str(report)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "INVARIANTS HOLD" in done.stdout
    summary = json.loads(report.read_text())
    # The live page's address while the sale ran, and a post-sale report per sale.
    assert "live page: http://127.0.0.1:" in done.stdout
    assert len(summary["reports"]) == 4
    for path in summary["reports"]:
        page = Path(path).read_text()
        assert page.count("<svg") == 5 and "For the next sale" in page, path
    assert summary["oversold"] == 0 and summary["missing_decisions"] == 0
    assert summary["repeated_decisions"] == 0 and summary["input_offsets_unaccounted"] == 0
    assert summary["accepted"] > 0 and summary["orders_in_postgres"] == summary["accepted"]
    assert summary["audit"] == "pass" and summary["audit_violations"] == []
    assert "audit (" in done.stdout and "PASS" in done.stdout
    assert summary["replay"] == "same" and summary["replay_tables_different"] == []
    # The second sale: a pre-queue, drawn by the sale clock, its draw recomputed from the log.
    assert summary["fairness_audit"] == "pass" and summary["fairness_violations"] == []
    seed = bytes.fromhex(summary["draw_seed"])
    assert hashlib.sha256(seed).hexdigest() == summary["draw_commitment"]
    assert summary["prequeue_entrants"] == 2_050 and summary["prequeue_winners"] == 200
    assert summary["prequeue_bot_winners"] <= 20  # ~4.9 expected: their share of people
    assert "fairness audit" in done.stdout and "revealed seed" in done.stdout
    # The third: orders held for payment; unpaid holds expire and their units go to the
    # waitlist until the whole allocation is paid for (charges = paid + refunded).
    assert summary["holds_audit"] == "pass" and summary["holds_invariants_hold"]
    assert summary["paid"] == 100 and summary["expired"] > 0 and summary["waitlist_served"] > 0
    assert summary["held"] == summary["paid"] + summary["expired"]
    # The fourth: the operator pauses (everyone waits), adds units, resumes, then cancels:
    # every hold released, every paid order refunded at the provider.
    assert summary["ops_audit"] == "pass" and summary["ops_invariants_hold"]
    assert (summary["ops_deferred"], summary["ops_added"], summary["ops_held"]) == (40, 5, 15)
    assert summary["ops_refunded"] == summary["ops_paid"] == summary["ops_charges"] > 0
    assert summary["ops_released"] == summary["ops_held"] - summary["ops_paid"]
    # And `flashsale replay` after the demo, its services stopped: every table the same.
    again = subprocess.run(
        [sys.executable, "-m", "flashsale.cli", "replay", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["verdict"] == "same" and result["sales"] == 4
    rows = {t["table"]: t["live_rows"] for t in result["tables"]}
    assert rows["orders"] == (summary["accepted"] + summary["prequeue_winners"] + summary["held"]
                              + summary["ops_held"])  # fmt: skip
    assert rows["intent_outcomes"] == (summary["unique_intents"] + summary["prequeue_intents"]
                                       + summary["holds_intents"]
                                       + summary["ops_intents"])  # fmt: skip


def test_bench_smoke_prints_and_writes_every_writer_figure(
    settings: Settings, endpoints: Endpoints, tmp_path: Path
):
    local_only(settings)
    out = tmp_path / "core.json"
    done = subprocess.run(
        [sys.executable, "-m", "flashsale.cli", "bench", "--only", "core", "--smoke",
         "--out", str(out)],
        env=_env(settings, endpoints, "t-bench-unused"),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    for name in ("backlog_accept-heavy_1_sku", "backlog_accept-heavy_1000_sku",
                 "backlog_oversubscribed_1_sku", "backlog_oversubscribed_1000_sku",
                 "backlog_accept-heavy-holds_1_sku"):  # fmt: skip
        assert figures[name]["decisions"] == figures[name]["intents"], name
        assert f"{figures[name]['decisions_per_s']}" in done.stdout
    assert figures["latency_at_half_max"]["decided"] > 0
    projection = figures["projection"]
    assert projection["decisions"] == projection["intents"]
    assert projection["audit"] == "pass" and projection["replay"] == "same"
    assert f"{projection['projection_decisions_per_s']}" in done.stdout
    with psycopg.connect(endpoints.dsn) as conn:  # its scratch schema was dropped
        assert not conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\\_%'"
        ).fetchall()
    restart = figures["restart"]
    assert restart["restart_to_first_decision_s_keeping_rocksdb"] > 0
    assert restart["restart_to_first_decision_s_from_empty_disk"] > 0


@pytest.mark.bench_smoke  # 135 s of CI's 25 min: run by make test-bench
def test_bench_compare_smoke_runs_every_system_and_none_oversells(
    settings: Settings, endpoints: Endpoints, tmp_path: Path
):
    local_only(settings)
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, "-m", "flashsale.cli", "bench", "--compare", "--smoke",
         "--out", str(out)],
        env=_env(settings, endpoints, "t-bench-unused"),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    systems = figures["systems"]
    assert set(systems) == {"flashsale_core", "flashsale_core_fsync_per_write", "flashsale_http",
                            "postgres", "postgres_sync_off", "redis",
                            "redis_fsync_always"}  # fmt: skip
    allocation = figures["workload"]["oversubscribed_allocation"]
    for name, system in systems.items():
        # CPU is read in 10 ms ticks: a smoke-sized run may show 0, never nothing.
        assert system["decisions_per_s"] > 0 and system["cpu_ms_per_1000"] is not None, name
        assert system["durability"] and system["latency_is"], name
        assert system["peak_pss_mb"] > 0, name
        # Open loop at half its maximum: the offered rate and its percentiles, in order.
        assert system["latency_offered_per_s"] > 0, name
        assert system["latency_ms_p50"] > 0 and system["latency_ms_p999"] is not None, name
        assert system["decisions_per_s_1000_skus"] > 0, name
        sold = system["oversubscribed"]
        # Ten intents per unit, two units per user: each design sells out, never more.
        assert sold["units_sold"] == allocation and sold["oversold"] == 0, (name, sold)
        assert system["oversold"] == 0 and sold.get("users_over_limit", 0) == 0, name
        assert sold.get("stock_agrees_with_orders", True), name  # Redis: counter vs stream
    for skus in ("1_sku", "1000_sku"):
        assert set(systems["postgres"]["sweep"][skus]) == {"8", "16", "32", "64"}
    over_http = systems["flashsale_http"]
    # Over HTTP the latency is to the decision: every intent answered was decided, and each
    # 202 came before its decision.
    assert over_http["undecided_after_120_s"] == 0
    assert over_http["answer_202"]["latency_ms_p50"] <= over_http["latency_ms_p50"]
    # Every intent answered 202 was decided, and the sale audit (from the topics) passed.
    assert over_http["oversubscribed"]["decisions"] == over_http["oversubscribed"][
        "intents_answered_202"] and over_http["oversubscribed"]["audit"] == "pass"  # fmt: skip
    assert figures["ratios"]["core_vs_postgres"] > 0
    assert "flashsale against the classic designs" in done.stdout
    for chart in ("throughput", "latency", "cost"):  # PNGs next to the JSON
        assert (tmp_path / f"compare-{chart}.png").read_bytes()[:4] == b"\x89PNG", chart
    with psycopg.connect(endpoints.dsn) as conn:  # the baseline's scratch schemas are gone
        assert not conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bl\\_%'"
        ).fetchall()
    assert not (settings.state_dir / "bench" / "redis").exists()  # its redis-server stopped
