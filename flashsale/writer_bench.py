"""How fast one inventory worker decides, on the real broker: the scenarios of `make bench`.

Every scenario runs in its own namespace (topics, consumer groups, RocksDB directory), which
is deleted afterwards. Figures are measured, never asserted:

* decisions/s: decisions in the log over the span from the first to the last decision's
  broker timestamp (one worker, exactly-once, ``FLASHSALE_COMMIT_INTERVAL_MS``);
* CPU µs per decision: the worker's (and the broker's) user+system CPU over that span,
  read from /proc, divided by the decisions;
* latency: an open-loop offered rate; decision seen by a read_committed consumer minus the
  time the intent was scheduled to be sent (so a load generator or producer falling behind
  counts, as it would for a client);
* restart: a worker stopped with N decided intents in its state, started again; time until
  the decision of one new intent is visible (keeping RocksDB, then from an empty disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from flashsale import intent_sig
from flashsale.kafka_auth import AdminClient, Consumer, Producer
from flashsale.settings import Settings, env_int
from flashsale.topics import TopicNames, catalogue
from infra import kafka_acl, provision
from infra.processes import PeakMemory, cpu_seconds
from infra.services import Service, SupervisorProcess
from producers.commands import CommandProducer, SkuAllocation, producer_config
from producers.identity import intent_id_for
from schemas.codec import SchemaRegistry

_TICK = os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | None) -> float | None:
    """VmHWM of a process in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (FileNotFoundError, TypeError):
        return None
    return None


class Namespace:
    """A private namespace for one scenario: topics, a producer, a worker, clean-up."""

    def __init__(
        self,
        settings: Settings,
        tag: str,
        broker_pid: int | None,
        topic_config: dict[str, str] | None = None,
        services: tuple[str, ...] = ("processor",),
    ) -> None:
        ns = f"bench-{tag}-{uuid.uuid4().hex[:6]}"
        self.settings = dataclasses.replace(settings, namespace=ns)
        self.bootstrap = settings.kafka_bootstrap
        self.names = TopicNames.of(self.settings)
        self.broker_pid = broker_pid
        provision.ensure_topics(self.bootstrap, catalogue(self.settings))
        if self.settings.kafka_auth == "scram":  # its services log in as on a secured cluster
            kafka_acl.ensure_principals(self.bootstrap, self.settings)
        if topic_config:  # e.g. flush.messages=1: the broker fsyncs every write
            try:
                _set_topic_config(self.bootstrap, [t.name for t in catalogue(self.settings)],
                                  topic_config)  # fmt: skip
            except Exception:
                self._delete_topics()  # nobody will call drop() on a namespace never made
                raise
        self.producer = CommandProducer(self.bootstrap, "bench", topic=self.names.sku_commands)
        self.worker = Service("processor", self.settings)  # its pid, log and CPU
        self.services = [Service(name, self.settings) for name in services]
        # Run as `make up` runs it: under the supervisor, which restarts a crashed worker.
        self.supervisor = SupervisorProcess(self.settings, services=services)
        self.env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "FLASHSALE_INFRA": "external",
            "DATABASE_URL": settings.database_url,
            "FLASHSALE_LOG_LEVEL": "WARNING",
            "FLASHSALE_SUPERVISE_BACKOFF_S": "0.2",
        }

    def open_sale(
        self, skus: list[str], allocation: int, per_user: int, hold_ms: int | None = None
    ) -> None:
        now = int(time.time() * 1000)
        allocations = [SkuAllocation(k, allocation, per_user, 1) for k in skus]
        self.producer.open_sale("bench", allocations, now - 1000, now + 3_600_000,
                                hold_ms=hold_ms)  # fmt: skip

    def intents(self, n: int, skus: list[str], users: int, prefix: str = "k") -> None:
        futures = []
        for i in range(n):
            futures.append(self.producer.submit_intent(
                "bench", skus[i % len(skus)], f"u{i % users}", 1, f"{prefix}{i}")[1])  # fmt: skip
            if len(futures) >= 20_000:
                self.producer.wait(futures)
                futures = []
        self.producer.wait(futures)

    def start(self) -> None:
        """Start the worker (under its supervisor)."""
        self.supervisor.start(env=self.env)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the worker decides: one probe intent (of no sale: rejected) decided."""
        reader = DecisionReader(self.bootstrap, self.names.decisions, from_end=True)
        try:
            self.intents(1, ["ready-probe"], 1, prefix=f"probe-{uuid.uuid4().hex[:6]}-")
            reader.wait(1, timeout)
            if reader.count < 1:
                raise RuntimeError(f"the worker of {self.settings.namespace} did not decide "
                                   f"in {timeout} s")  # fmt: skip
        finally:
            reader.close()

    def restarts(self) -> int | None:
        """How often the supervisor restarted the worker (a crash shows here)."""
        state = self.supervisor.state().get("services", {}).get("processor", {})
        return state.get("restarts")

    def stop(self) -> None:
        """Stop the services and their supervisor."""
        self.supervisor.stop()
        for service in self.services:
            service.stop()

    def drop(self) -> None:
        """Stop the worker, delete the namespace's topics and RocksDB directory."""
        self.stop()
        self.producer.close()
        self._delete_topics()
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.settings.state_dir / "run" / self.settings.namespace, ignore_errors=True)

    def _delete_topics(self) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        names = [t.name for t in catalogue(self.settings)]
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # already gone: nothing to tidy
                fut.result()

    @property
    def datadir(self) -> Path:
        return self.settings.state_dir / "processor" / f"{self.settings.namespace}-inventory"


def _set_topic_config(bootstrap: str, topics: list[str], config: dict[str, str]) -> None:
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    resources = [
        ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in config.items()
        ])
        for topic in topics
    ]  # fmt: skip
    for fut in admin.incremental_alter_configs(resources).values():
        fut.result(30)


class DecisionReader:
    """A read_committed consumer of the decisions topic: counts decisions, stamps, latencies."""

    def __init__(self, bootstrap: str, topic: str, from_end: bool = False) -> None:
        """``from_end``: only decisions written from now on (a long-lived namespace)."""
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                            "isolation.level": "read_committed", "enable.auto.commit": False,
                            # librdkafka waits up to 500 ms per empty fetch by default: that
                            # would be measured as decision latency.
                            "fetch.wait.max.ms": 10, "log_level": 3})  # fmt: skip
        parts = self._c.list_topics(topic, timeout=10).topics[topic].partitions
        # From the end: the end offsets asked for now, so nothing written from here on is
        # missed (OFFSET_END would be resolved at the first fetch, possibly after a write).
        starts = {p: (self._c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                      if from_end else OFFSET_BEGINNING) for p in parts}  # fmt: skip
        self._c.assign([TopicPartition(topic, p, start) for p, start in starts.items()])
        self._registry = SchemaRegistry.load_default()
        # Only decisions count (the topic also holds SaleOpened and the other sale facts).
        self._decisions = {self._registry.fingerprint(n) for n in ("IntentAccepted",
                                                                   "IntentRejected")}  # fmt: skip
        self._accepted = self._registry.fingerprint("IntentAccepted")
        self.count = 0
        self.accepted = 0
        self.first_ms: int | None = None
        self.last_ms: int | None = None
        self.seen_ms: dict[str, float] = {}  # intent id -> wall time its decision was read

    def poll(self, timeout: float = 0.2, latency: bool = False) -> int:
        fps = self._decisions
        msgs = [m for m in self._c.consume(10_000, timeout)
                if not m.error() and (m.value() or b"")[2:10] in fps]  # fmt: skip
        now = time.time() * 1000
        for m in msgs:
            stamp = m.timestamp()[1]
            self.first_ms = stamp if self.first_ms is None else self.first_ms
            self.last_ms = stamp
            if latency:
                self.seen_ms[self._registry.decode(m.value() or b"")[1]["intent_id"]] = now
        self.count += len(msgs)
        self.accepted += sum(1 for m in msgs if (m.value() or b"")[2:10] == self._accepted)
        return len(msgs)

    def wait(self, n: int, timeout: float, on_first: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            had = self.count
            self.poll()
            if had == 0 and self.count and on_first is not None:
                on_first()

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Poll (recording when each decision is seen) on a thread of its own while the
        ``with`` body runs: polling between sends would add to the latency measured."""
        stop = threading.Event()

        def follow() -> None:
            while not stop.is_set():
                self.poll(0.05, latency=True)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        self._c.close()


def backlog(
    settings: Settings,
    broker_pid: int | None,
    n: int,
    skus: int,
    mix: str,
    fsync_per_write: bool = False,
) -> dict:
    """n intents already in the topic, then one fresh worker decides them all (with
    ``fsync_per_write``, the broker fsyncs every write of the namespace's topics). The mix
    ``accept-heavy-holds`` is accept-heavy in a sale whose orders are held for payment:
    every acceptance also creates a hold the writer keeps and persists."""
    flush = {"flush.messages": "1"} if fsync_per_write else None
    ns = Namespace(settings, f"{mix}-{skus}", broker_pid, topic_config=flush)
    try:
        names = [f"sku-{i:04d}" for i in range(skus)]
        users = max(1, n // 4)
        if mix.startswith("accept-heavy"):  # every intent accepted: each decrements stock
            allocation = n // skus + 1
            ns.open_sale(names, allocation=allocation, per_user=n,
                         hold_ms=600_000 if mix.endswith("holds") else None)  # fmt: skip
        else:  # oversubscribed: one unit in ten finds stock
            allocation = max(1, n // (10 * skus))
            ns.open_sale(names, allocation=allocation, per_user=2)
        intake0 = cpu_seconds(broker_pid)
        ns.intents(n, names, users)
        intake = cpu_seconds(broker_pid) - intake0  # the broker taking the intents in
        reader = DecisionReader(ns.bootstrap, ns.names.decisions)
        ns.start()
        cpu: dict[str, float] = {}

        def mark() -> None:
            cpu["worker0"] = cpu_seconds(ns.worker.pid())
            cpu["broker0"] = cpu_seconds(broker_pid)

        with PeakMemory(lambda: [p for p in (ns.worker.pid(), broker_pid) if p]) as memory:
            reader.wait(n, 600, on_first=mark)
        worker_cpu = cpu_seconds(ns.worker.pid()) - cpu.get("worker0", 0.0)
        broker_cpu = cpu_seconds(broker_pid) - cpu.get("broker0", 0.0)
        peak = peak_rss_mb(ns.worker.pid())
        reader.close()
        span = ((reader.last_ms or 0) - (reader.first_ms or 0)) / 1000
        decided = reader.count
        return {
            "intents": n, "skus": skus, "mix": mix, "decisions": decided,
            "seconds_first_to_last": round(span, 2),
            "decisions_per_s": round(decided / span) if span > 0 else None,
            "worker_cpu_us_per_decision": round(worker_cpu / decided * 1e6, 1) if decided else None,
            "broker_cpu_us_per_decision": round(broker_cpu / decided * 1e6, 1) if decided else None,
            "broker_intake_cpu_us_per_intent": round(intake / n * 1e6, 1),
            "worker_peak_rss_mb": peak,
            "worker_and_broker_peak_pss_mb": memory.peak_mb,
            # Each intent is one unit: more accepted than allocated would be an oversell.
            "units_sold": reader.accepted, "allocation": allocation * skus,
            "oversold": max(0, reader.accepted - allocation * skus) if skus == 1 else None,
        }  # fmt: skip
    finally:
        ns.drop()


# The load generator batches as a busy edge does. Latency runs from the intent's log-append
# time, so this does not shorten it; it spares the broker, which on this kind of machine pays
# ~0.5 ms of CPU per request whatever its size (2 ms made ~900 produce requests/s at 5,000/s).
LOADGEN_LINGER_MS = 20
# Discarded before measuring: a freshly started broker spends ~0.35 of a core compiling
# (JIT) in its first minutes of a new workload, which no long-running broker does.
WARMUP_S = 5


def latency(settings: Settings, broker_pid: int | None, rate: int, seconds: int,
            skus: int = 100, fsync_per_write: bool = False) -> dict:  # fmt: skip
    """Open loop: ``rate`` intents/s (Poisson arrivals, fixed seed) over ``skus`` SKUs for a
    warm-up and then ``seconds`` measured."""
    from producers.load import Plan, percentiles

    flush = {"flush.messages": "1"} if fsync_per_write else None
    ns = Namespace(settings, "latency", broker_pid, topic_config=flush)
    try:
        names = [f"sku-{i}" for i in range(skus)]
        warm = rate * WARMUP_S
        plan = Plan.make(7, rate, WARMUP_S + seconds, 0, rate * seconds, names)
        total = len(plan.at)
        ns.open_sale(names, allocation=total, per_user=total)
        reader = DecisionReader(ns.bootstrap, ns.names.decisions)
        ns.start()
        ns.intents(1, names, 1, prefix="warm")  # the worker has joined once this is decided
        reader.wait(1, 120)
        # Encoded up front and produced raw: the load generator shares the two cores, and a
        # busy one would show up as decision latency.
        keys = [(f"u{u}", k, f"k{i}") for i, (u, k) in enumerate(zip(plan.users, plan.skus,
                                                                       strict=True))]  # fmt: skip
        values = [ns.producer.encode_intent("bench", k, u, 1, key) for u, k, key in keys]
        ids = [intent_id_for(u, "bench", k, key) for u, k, key in keys]
        raw = Producer({**producer_config(ns.bootstrap), "linger.ms": LOADGEN_LINGER_MS})
        with reader.following():
            t0, wall0 = time.monotonic(), time.time() * 1000
            for i, value in enumerate(values):
                delay = t0 + plan.at[i] - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if i == warm:  # the measured window starts here
                    t1 = time.monotonic()
                    cpu0 = (cpu_seconds(ns.worker.pid()), cpu_seconds(broker_pid),
                            time.process_time())  # fmt: skip
                raw.produce(ns.names.sku_commands, value, key=plan.skus[i].encode(),
                            headers=intent_sig.headers(value))  # fmt: skip
                raw.poll(0)
            raw.flush(30)
            elapsed = time.monotonic() - t1
            offered = (total - warm) / elapsed
            share = [round((now - then) / elapsed, 2) for now, then in zip(
                (cpu_seconds(ns.worker.pid()), cpu_seconds(broker_pid), time.process_time()),
                cpu0, strict=True)]  # fmt: skip
            deadline = time.monotonic() + 60  # until every decision is seen, or 60 s
            while reader.count < total + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        reader.close()
        measured = range(warm, total)
        lat = [(reader.seen_ms[ids[i]] - wall0 - plan.at[i] * 1000) / 1000
               for i in measured if ids[i] in reader.seen_ms]  # fmt: skip
        return {"offered_per_s": round(offered), "skus": skus, "warmup_s": WARMUP_S,
                "decided": len(lat), "undecided_after_60_s": len(measured) - len(lat),
                "loadgen_linger_ms": LOADGEN_LINGER_MS,
                "cpu_share_worker_broker_loadgen": share, **percentiles(lat),
                "latency_ms_max": round(max(lat) * 1000, 1) if lat else None}  # fmt: skip
    finally:
        ns.drop()


def restart(settings: Settings, broker_pid: int | None, n: int) -> dict:
    """Time from start to a new decision with n decided intents in state: kept, then wiped."""
    ns = Namespace(settings, "restart", broker_pid)
    try:
        skus = [f"sku-{i:04d}" for i in range(100)]
        ns.open_sale(skus, allocation=n, per_user=n)
        ns.intents(n, skus, max(1, n // 4))
        reader = DecisionReader(ns.bootstrap, ns.names.decisions)
        ns.start()
        reader.wait(n, 1800)
        peak = peak_rss_mb(ns.worker.pid())
        out: dict[str, Any] = {"decided_intents_in_state": reader.count, "worker_peak_rss_mb": peak}
        for label, wipe in (("keeping_rocksdb", False), ("from_empty_disk", True)):
            ns.stop()
            if wipe:
                shutil.rmtree(ns.datadir, ignore_errors=True)
            had = reader.count
            t0 = time.monotonic()
            ns.start()
            ns.intents(1, skus, 1, prefix=f"after-{label}-")
            reader.wait(had + 1, 600)
            out[f"restart_to_first_decision_s_{label}"] = round(time.monotonic() - t0, 2)
            out[f"worker_peak_rss_mb_{label}"] = peak_rss_mb(ns.worker.pid())
            out[f"worker_restarts_{label}"] = ns.restarts()
        reader.close()
        return out
    finally:
        ns.drop()


def commit_interval_ms() -> int:
    """The commit interval the worker runs with (its setting, or the default)."""
    return env_int(os.environ, "FLASHSALE_COMMIT_INTERVAL_MS", 100, 1, 60_000)
