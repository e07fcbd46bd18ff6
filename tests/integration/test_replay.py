"""`flashsale replay` against the real broker and database, in a namespace of its own.

The live projection runs as the `flashsale projector` does (a subprocess, under the
namespace's tracking name) and is SIGKILLed mid-backlog, then restarted; the replay must
find every projection table identical, with row counts computed here from the log we wrote.
A row changed by hand in the live tables must make it report that table, and exit 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from confluent_kafka.admin import AdminClient

from flashsale.settings import REPO_ROOT, Settings
from flashsale.topics import TopicNames, catalogue
from infra import migrate, provision
from infra.stack import Endpoints
from projections import analytics
from projections.catch_up import wait_until_projected
from projections.commands import live_name
from projections.store import reset
from tests.integration.test_projection import (
    DECISIONS,
    build_log,
    log_ends,
    outcome_count,
    produce,
    stored_offsets,
)


def _env(settings: Settings, endpoints: Endpoints) -> dict[str, str]:
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.bootstrap,
        "DATABASE_URL": endpoints.dsn,
        "FLASHSALE_INFRA": "external",
        "FLASHSALE_NAMESPACE": settings.namespace,
        "FLASHSALE_STATE_DIR": str(settings.state_dir),
        "FLASHSALE_LOG_FORMAT": "json",
    }


def _replay(settings: Settings, endpoints: Endpoints) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "flashsale.cli", "replay", "--json", "--wait", "20"],
        cwd=REPO_ROOT, env=_env(settings, endpoints), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def test_replay_equals_live_after_a_projector_sigkill_and_names_a_tampered_table(
    settings: Settings, endpoints: Endpoints, uid: str, tmp_path: Path
):
    ns = dataclasses.replace(settings, namespace=f"t-replay-{uid}")
    names = TopicNames.of(ns)
    migrate.apply(endpoints.dsn)
    provision.ensure_topics(endpoints.bootstrap, catalogue(ns))
    topics = (names.decisions,)
    deadline = time.monotonic() + 30
    while True:  # topics created just now may not have leaders yet
        try:
            log_ends(endpoints.bootstrap, topics)
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    sale_id, skus = f"s-replay-{uid}", [f"kr-{uid}-{i}" for i in range(4)]
    records, unique = build_log(sale_id, skus, per_sku=3000, dup_every=9)
    assert {t for t, _, _ in records} == {DECISIONS}
    produce(endpoints.bootstrap, [(names.decisions, k, v) for _, k, v in records])
    end = log_ends(endpoints.bootstrap, topics)
    projection = live_name(ns)

    def spawn(tag: str, service: str = "projector") -> subprocess.Popen:
        cmd = [sys.executable, "-m", "flashsale.cli", service, "--batch-size", "300"]
        with (tmp_path / f"{tag}.log").open("wb") as out:
            return subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=_env(ns, endpoints), stdout=out, stderr=out
            )

    # The replay compares the analytics projection too: it runs live alongside (its own
    # SIGKILL is tests/integration/test_analytics.py's).
    live_analytics = spawn("analytics", "analytics")
    try:
        first = spawn("first")
        while outcome_count(endpoints.dsn, sale_id) < 1500:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline + 60, "the live projector never got going"
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        at_kill = outcome_count(endpoints.dsn, sale_id)
        assert 0 < at_kill < len(unique), f"the kill must land mid-backlog ({at_kill})"

        second = spawn("second")
        try:
            limit = time.monotonic() + 60
            while any(stored_offsets(endpoints.dsn, projection).get(tp, 0) < o
                      for tp, o in end.items()):  # fmt: skip
                assert second.poll() is None, (tmp_path / "second.log").read_text()[-2000:]
                assert time.monotonic() < limit, "the restarted projector did not catch up"
                time.sleep(0.05)
            wait_until_projected(endpoints.bootstrap, endpoints.dsn, analytics.live_name(ns),
                                 (names.sku_commands, names.decisions), timeout=60)  # fmt: skip
            code, result = _replay(ns, endpoints)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(15) == 0

        tables = {t["table"]: t for t in result["tables"]}
        assert code == 0 and result["verdict"] == "same", result
        accepted = sum(1 for d in unique if "order_id" in d)
        expected = {"sales": 4, "orders": accepted, "intent_outcomes": len(unique),
                    "sale_counters": 4}  # fmt: skip
        assert {t: tables[t]["replayed_rows"] for t in expected} == expected
        assert {t: tables[t]["live_rows"] for t in expected} == expected
        assert tables["analytics_seconds"]["replayed_rows"] > 0
        assert result["offsets_replayed"] == sum(end.values())

        with psycopg.connect(endpoints.dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE sale_counters SET remaining = remaining + 1"
                " WHERE sale_id = %s AND sku = %s",
                (sale_id, skus[0]),
            )
        code, result = _replay(ns, endpoints)
        assert code == 1 and result["verdict"] == "different"
        assert [t["table"] for t in result["tables"] if not t["same"]] == ["sale_counters"]
        with psycopg.connect(endpoints.dsn) as conn:  # every replay schema was dropped
            assert not conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'replay\\_%'"
            ).fetchall()
    finally:
        live_analytics.send_signal(signal.SIGTERM)
        live_analytics.wait(15)
        reset(endpoints.dsn, projection, sale_ids=[sale_id])
        with psycopg.connect(endpoints.dsn, autocommit=True) as conn:
            for table in analytics.TABLES:
                conn.execute(f"DELETE FROM {table} WHERE sale_id = %s", (sale_id,))
        AdminClient({"bootstrap.servers": endpoints.bootstrap}).delete_topics(
            [t.name for t in catalogue(ns)]
        )
