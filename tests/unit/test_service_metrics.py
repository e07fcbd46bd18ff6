"""A service's /metrics: served on loopback, found through its card, scraped, cleaned up."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rich.console import Console

from flashsale import top
from flashsale.scrape import rate, scrape, targets
from flashsale.service_metrics import ServiceMetrics, cards, metrics_dir
from flashsale.settings import Settings


def test_a_service_card_is_found_scraped_and_removed(tmp_path: Path):
    settings = dataclasses.replace(Settings.from_env({}), state_dir=tmp_path, namespace="t-m")
    totals = {"decisions": 0, "batches": 0}
    metrics = ServiceMetrics(settings, "processor")
    metrics.stats(lambda: dict(totals), gauges=["batches"])
    with metrics.serving() as port:
        [card] = cards(settings)
        assert card == {"service": "processor", "pid": os.getpid(), "port": port}
        [target] = targets(settings)
        before = scrape(target)
        assert before.error is None
        assert before.value("flashsale_processor_decisions_total") == 0
        assert before.value("process_resident_memory_bytes") > 0
        totals["decisions"] = 500
        after = scrape(targets(settings)[0])
        assert after.value("flashsale_processor_decisions_total") == 500
        assert (rate(after, before, "flashsale_processor_decisions_total") or 0) > 0
        console = Console(record=True, width=160)
        console.print(top.services_table([after], {"processor": before}, {"processor": 2}))
        row = next(ln for ln in console.export_text().splitlines() if "processor" in ln)
        assert str(os.getpid()) in row and row.rstrip(" │").endswith("2")
    assert list(metrics_dir(settings).glob("*.json")) == []
    assert cards(settings) == []


def test_each_instance_has_its_own_card_and_a_dead_ones_is_swept(tmp_path: Path):
    settings = dataclasses.replace(Settings.from_env({}), state_dir=tmp_path, namespace="t-m")
    where = metrics_dir(settings)
    where.mkdir(parents=True)
    dead = where / "processor-999999999.json"
    dead.write_text('{"service": "processor", "pid": 999999999, "port": 1}')
    with ServiceMetrics(settings, "processor").serving() as port:
        assert not dead.exists()  # a killed instance's card is swept at start
        # Named by pid: another worker process of the same service writes its own card.
        card = where / f"processor-{os.getpid()}.json"
        assert [p.name for p in where.glob("*.json")] == [card.name]
        assert cards(settings)[0]["port"] == port
    assert cards(settings) == []


def test_a_dead_service_card_is_ignored(tmp_path: Path):
    settings = dataclasses.replace(Settings.from_env({}), state_dir=tmp_path, namespace="t-m")
    where = metrics_dir(settings)
    where.mkdir(parents=True)
    (where / "clock-999999999.json").write_text('{"service": "clock", "pid": 999999999, "port": 1}')
    assert cards(settings) == []
