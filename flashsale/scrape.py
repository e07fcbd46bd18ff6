"""Scraping the namespace's ``/metrics`` endpoints (for ``flashsale top`` and the live page).

Targets are the services' metric cards (``flashsale.service_metrics``) and every app server
(``run/<ns>/http/app-<port>.pid``).
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from flashsale.service_metrics import cards
from flashsale.settings import Settings
from infra import processes

# The counter that says how much work a service did, per kind of service
# (``flashsale top`` and the live page show it per second).
WORK = {
    "processor": ("flashsale_processor_decisions_total", "decisions"),
    "projector": ("flashsale_projector_records_total", "records"),
    "analytics": ("flashsale_analytics_records_total", "records"),
    "clock": ("flashsale_clock_steps_total", "steps"),
    "payments": ("flashsale_payments_recorded_total", "payments"),
    "app": ("flashsale_intents_accepted_total", "202s"),
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Scrape:
    """One process's metrics at one moment."""

    name: str
    kind: str
    pid: int | None
    url: str
    at: float = 0.0
    samples: Samples = field(default_factory=dict)
    error: str | None = None

    @property
    def key(self) -> str:
        """One process: its name and pid (several instances of a service share the name)."""
        return f"{self.name}/{self.pid}"

    def value(self, metric: str, **labels: str) -> float:
        """Sum of ``metric``'s samples whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == metric and want <= set(ls))


def scrape(target: Scrape, timeout: float = 1.0) -> Scrape:
    try:
        with urllib.request.urlopen(target.url, timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError as exc:
        target.error = str(exc)
        return target
    target.at = time.monotonic()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            target.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return target


def targets(settings: Settings) -> list[Scrape]:
    """Every process of the namespace that serves ``/metrics`` now."""
    found = [
        Scrape(c["service"], c["service"], int(c["pid"]), f"http://127.0.0.1:{c['port']}/metrics")
        for c in cards(settings)
    ]
    http = settings.state_dir / "run" / settings.namespace / "http"
    for pidfile in sorted(http.glob("app-*.pid")):
        pid = processes.read_pid(pidfile)
        if pid is not None:
            port = pidfile.stem.removeprefix("app-")
            found.append(Scrape(f"app:{port}", "app", pid, f"http://127.0.0.1:{port}/metrics"))
    return found


def rate(now: Scrape, before: Scrape | None, metric: str) -> float | None:
    """``metric``'s increase per second between two scrapes of one process (None: unknown)."""
    if before is None or before.error or now.error or now.at <= before.at:
        return None
    return (now.value(metric) - before.value(metric)) / (now.at - before.at)


def quantile_between(now: Scrape, before: Scrape | None, metric: str, q: float) -> float | None:
    """The ``q`` quantile of histogram ``metric`` (its ``_bucket`` samples, summed over
    every other label) over what it observed between two scrapes, as the upper bound of the
    bucket it falls in (None: nothing observed, or no earlier scrape)."""
    if before is None or before.error or now.error:
        return None
    by_le: dict[float, float] = {}
    for (name, labels), value in now.samples.items():
        if name == f"{metric}_bucket":
            le = float(dict(labels)["le"])
            by_le[le] = by_le.get(le, 0.0) + value - before.samples.get((name, labels), 0.0)
    bounds = sorted(by_le)
    if not bounds or by_le[bounds[-1]] <= 0:
        return None
    wanted = q * by_le[bounds[-1]]
    return next(b for b in bounds if by_le[b] >= wanted)
