"""A service's /metrics: served on loopback, found through its card, scraped, cleaned up."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from flashsale import top
from flashsale.scrape import Scrape, quantile_between, rate, scrape, targets
from flashsale.service_metrics import ServiceMetrics, cards, metrics_dir
from flashsale.settings import Settings
from producers.http.metrics import EdgeMetrics


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


def _scraped(metrics: EdgeMetrics, at: float) -> Scrape:
    """What a scrape of an app server with these metrics reads, at monotonic time ``at``."""
    out = Scrape("app:1", "app", 1, "", at=at)
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_top_shows_each_app_servers_rates_and_latency_between_two_scrapes():
    metrics = EdgeMetrics()
    metrics.placed(0.5)  # before the first scrape: not in the figures between the two
    before = _scraped(metrics, 10.0)
    for _ in range(99):
        metrics.placed(0.002)  # written: Kafka acked in 2 ms
    metrics.placed(0.2)
    for _ in range(10):
        metrics.placed(None)  # repeats: answered 202, nothing written
    for _ in range(5):
        metrics.rate_limited.inc()
    after = _scraped(metrics, 12.0)  # two seconds later
    ack = "flashsale_http_kafka_ack_seconds"
    assert quantile_between(after, before, ack, 0.5) == 0.0025  # the bucket's upper bound
    assert quantile_between(after, before, ack, 0.99) == 0.0025
    assert quantile_between(after, before, ack, 1.0) == 0.25
    assert quantile_between(after, None, ack, 0.5) is None
    console = Console(record=True, width=200)
    console.print(top.edge_table([after], {after.key: before}))
    row = next(ln for ln in console.export_text().splitlines() if "app:1" in ln)
    cells = [c.strip() for c in row.strip(" │").split("│")]
    # 110 answered 202 in 2 s, 5 of them per second repeats; 2.5 429s per second
    assert cells[2:6] == ["55", "2.5", "0.0", "5.0"], cells
    assert cells[8] == "≤2.5", cells
