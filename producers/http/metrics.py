"""Prometheus metrics of one app server (its own registry: nothing global at import)."""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EdgeMetrics:
    """Request counts and latency by route, plus the intent outcomes the edge produced."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU seconds, resident memory, open files
        self.requests = Counter(
            "flashsale_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flashsale_http_request_duration_seconds",
            "Time to the last byte of the response, by route template (streams excluded)",
            ["route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.intents_accepted = Counter(
            "flashsale_intents_accepted",
            "Intents answered 202 (acknowledged by Kafka)",
            registry=self.registry,
        )
        self.intent_repeats = Counter(
            "flashsale_http_intent_repeats",
            "Intents answered 202 with nothing written: a retry of an intent already in the "
            "log, answered from this server's memory or from the projection (never in the log)",
            registry=self.registry,
        )
        self.kafka_ack = Histogram(
            "flashsale_http_kafka_ack_seconds",
            "Time from handing an intent to the producer to Kafka's acknowledgement",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.unavailable = Counter(
            "flashsale_http_unavailable",
            "503 answers (Kafka or PostgreSQL did not answer in time)",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "flashsale_http_rate_limited",
            "429 answers (per-user rate limit)",
            registry=self.registry,
        )

        self.gc_pause = Histogram(
            "flashsale_http_gc_pause_seconds",
            "Cyclic garbage collections of this process, by generation (each stops the loop)",
            ["generation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )

    def placed(self, ack_s: float | None) -> None:
        """One intent answered 202: written (its ack time observed) or a repeat."""
        self.intents_accepted.inc()
        if ack_s is None:
            self.intent_repeats.inc()
        else:
            self.kafka_ack.observe(ack_s)

    def watch_gc(self) -> None:
        """Time every cyclic garbage collection of this process (``gc.callbacks``)."""
        by_generation = [self.gc_pause.labels(str(g)) for g in range(3)]
        started = [0.0]

        def timed(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                by_generation[info["generation"]].observe(time.perf_counter() - started[0])

        gc.callbacks.append(timed)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
