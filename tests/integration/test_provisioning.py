"""Topic provisioning is idempotent and reports drift instead of ignoring it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from flashsale.settings import Settings
from flashsale.topics import catalogue
from infra import provision
from infra.stack import Endpoints


def test_catalogue_topics_exist_and_match(endpoints: Endpoints, settings: Settings):
    created, drift = provision.ensure_topics(endpoints.bootstrap, catalogue(settings))
    assert created == [] and drift == []


def test_create_is_idempotent_and_drift_is_reported(endpoints: Endpoints, settings: Settings, uid):
    base = catalogue(settings)[0]
    spec = dataclasses.replace(base, name=f"t-drift-{uid}", partitions=3)
    assert provision.ensure_topics(endpoints.bootstrap, [spec]) == ([spec.name], [])
    assert provision.ensure_topics(endpoints.bootstrap, [spec]) == ([], [])

    wider = dataclasses.replace(spec, partitions=4, retention_ms=1000)
    created, drift = provision.ensure_topics(endpoints.bootstrap, [wider])
    assert created == []
    assert any("has 3 partitions, catalogue says 4" in d for d in drift), drift
    assert any("retention.ms=-1, catalogue says 1000" in d for d in drift), drift


def test_status_json_reports_both_servers(endpoints: Endpoints):
    out = subprocess.run(
        [sys.executable, "-m", "flashsale.cli", "infra", "status", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    assert status["kafka"]["bootstrap_servers"] == endpoints.bootstrap
    assert status["kafka"]["up"] is True
    assert status["postgres"]["dsn"] == endpoints.dsn
    assert status["postgres"]["up"] is True
