"""Prometheus ``/metrics`` for the long-running services (writer, projector, analytics, sale
clock, payment service); the app servers serve theirs on their own port (producers.http).

Each service opens its own registry on an ephemeral loopback port (never through nginx) and
writes where it listens to ``<state>/run/<namespace>/metrics/<service>-<pid>.json`` (one
card per instance: several writer workers each have theirs), which ``flashsale top`` reads.
Every service exports:

* process CPU seconds, resident memory and open files (``process_*``);
* its own counters (``flashsale_<service>_<name>``), read from a dict the service keeps;
* for a consumer, its group's lag per partition (``flashsale_consumer_lag``): the broker's end
  offset minus the group's committed offset, asked of the broker at scrape time (cached 1 s).

Restarts are the supervisor's (``supervisor.prom`` in the same run directory).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flashsale.kafka_auth import Consumer
from flashsale.settings import Settings

log = structlog.get_logger(__name__)

LAG_CACHE_S = 1.0


def metrics_dir(settings: Settings) -> Path:
    """Where the namespace's services say on which port they serve ``/metrics``."""
    return settings.state_dir / "run" / settings.namespace / "metrics"


class StatsCollector(Collector):
    """A service's own counters and gauges, read from ``stats()`` at scrape time."""

    def __init__(
        self,
        service: str,
        stats: Callable[[], Mapping[str, float]],
        gauges: Iterable[str] = (),
    ) -> None:
        self.prefix = f"flashsale_{service}_"
        self.stats = stats
        self.gauges = frozenset(gauges)

    def collect(self) -> Iterator[Metric]:
        for key, value in sorted(self.stats().items()):
            name = self.prefix + key
            if key in self.gauges:
                yield GaugeMetricFamily(name, key.replace("_", " "), value=value)
            else:
                yield CounterMetricFamily(name, key.replace("_", " "), value=value)


class LagCollector(Collector):
    """A consumer group's lag per partition, from the broker (a probe outside the group)."""

    def __init__(self, bootstrap: str, group: str, topics: Sequence[str]) -> None:
        self.group, self.topics = group, list(topics)
        self._probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                "enable.auto.commit": False, "log_level": 3})  # fmt: skip
        self._lock = threading.Lock()
        self._cached: tuple[float, list[tuple[str, int, int, int]]] = (0.0, [])

    def lags(self) -> list[tuple[str, int, int, int]]:
        """(topic, partition, committed, end) per partition; committed -1 when none yet."""
        with self._lock:
            at, rows = self._cached
            if time.monotonic() - at < LAG_CACHE_S:
                return rows
            rows = []
            meta = self._probe.list_topics(timeout=2.0)
            tps = [
                TopicPartition(t, p)
                for t in self.topics
                if t in meta.topics
                for p in sorted(meta.topics[t].partitions)
            ]
            for tp in self._probe.committed(tps, timeout=2.0) if tps else []:
                _, end = self._probe.get_watermark_offsets(tp, timeout=2.0, cached=False)
                rows.append((tp.topic, tp.partition, tp.offset, end))
            self._cached = (time.monotonic(), rows)
            return rows

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "flashsale_consumer_lag",
            "Records between the group's committed offset and the partition's end",
            labels=["group", "topic", "partition"],
        )
        try:
            rows = self.lags()
        except KafkaException as exc:  # the broker is away: no lag figures this scrape
            log.warning("metrics.lag_unavailable", group=self.group, error=str(exc))
            rows = []
        for topic, partition, committed, end in rows:
            lag.add_metric([self.group, topic, str(partition)], end - max(committed, 0))
        yield lag

    def close(self) -> None:
        with self._lock:  # not while a scrape uses it
            self._probe.close()


class ServiceMetrics:
    """One service's registry; ``serving()`` exposes it while the service runs."""

    def __init__(self, settings: Settings, service: str) -> None:
        self.settings, self.service = settings, service
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._closers: list[Callable[[], None]] = []

    def stats(self, stats: Callable[[], Mapping[str, float]], gauges: Iterable[str] = ()) -> None:
        """Export the service's own counters (``gauges`` names those that are not counters)."""
        self.registry.register(StatsCollector(self.service, stats, gauges))

    def lag(self, bootstrap: str, group: str, topics: Sequence[str]) -> None:
        """Export ``group``'s lag on ``topics`` per partition."""
        collector = LagCollector(bootstrap, group, topics)
        self.registry.register(collector)
        self._closers.append(collector.close)

    @contextmanager
    def serving(self) -> Iterator[int]:
        """Serve ``/metrics`` on an ephemeral loopback port while the block runs; its port."""
        server, thread = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        port = int(server.server_port)
        where = metrics_dir(self.settings)
        where.mkdir(parents=True, exist_ok=True)
        for stale in where.glob(f"{self.service}-*.json"):  # left by a killed instance
            if not _alive(_owner(stale)):
                stale.unlink(missing_ok=True)
        card = where / f"{self.service}-{os.getpid()}.json"  # one per instance
        tmp = card.with_suffix(".tmp")
        tmp.write_text(json.dumps({"service": self.service, "pid": os.getpid(), "port": port}))
        tmp.replace(card)
        log.info("metrics.serving", service=self.service, port=port)
        try:
            yield port
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=2.0)
            card.unlink(missing_ok=True)
            for close in self._closers:
                close()


def _owner(card: Path) -> int | None:
    try:
        return int(json.loads(card.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def cards(settings: Settings) -> list[dict[str, Any]]:
    """The processes of the namespace that say they serve ``/metrics`` (live pids only)."""
    found = []
    for card in sorted(metrics_dir(settings).glob("*.json")):
        try:
            info = json.loads(card.read_text())
        except (OSError, ValueError):
            continue
        if _alive(info.get("pid")):
            found.append(info)
    return found
