"""A private pipeline per test module: own topics, processor and projector (real processes)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flashsale.audit import DecisionAudit
from flashsale.settings import Settings
from flashsale.topics import TopicNames, catalogue
from infra import kafka_acl, provision
from infra.services import Service
from infra.stack import Endpoints
from producers.commands import CommandProducer, SkuAllocation


@dataclass
class Pipeline:
    """Settings under a unique namespace plus the services running on it."""

    settings: Settings
    endpoints: Endpoints
    processor: Service
    projector: Service
    env: dict[str, str]

    @property
    def names(self) -> TopicNames:
        return TopicNames.of(self.settings)

    def producer(self) -> CommandProducer:
        return CommandProducer(self.endpoints.bootstrap, "tests", topic=self.names.sku_commands)

    def audit(self, sale_id: str, committed_only: bool = True) -> DecisionAudit:
        return DecisionAudit(self.endpoints.bootstrap, self.names, sale_id, committed_only)

    def open_sale(
        self,
        sale_id: str,
        skus: list[SkuAllocation],
        starts_in_ms: int = -1000,
        progress_every: int | None = None,
    ) -> None:
        now = int(time.time() * 1000)
        self.producer().open_sale(sale_id, skus, now + starts_in_ms, now + 3_600_000,
                                  progress_every=progress_every)  # fmt: skip

    def stop(self) -> None:
        self.projector.stop()
        self.processor.stop()


def start_pipeline(
    settings: Settings,
    endpoints: Endpoints,
    uid: str,
    extra_env: dict[str, str] | None = None,
    start_processor: bool = True,
    unprovisioned: tuple[str, ...] = (),
) -> Pipeline:
    """Provision a namespace's topics and start its processor (unless told not to) and projector."""
    ns = f"t-{uid}"
    s = dataclasses.replace(settings, namespace=ns)
    specs = [t for t in catalogue(s) if t.name not in unprovisioned]
    provision.ensure_topics(endpoints.bootstrap, specs)
    if s.kafka_auth == "scram":  # the services' principals, in this namespace
        kafka_acl.ensure_principals(endpoints.bootstrap, s)
    env = {  # namespace and state dir come from the Service's settings
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.bootstrap,
        "DATABASE_URL": endpoints.dsn,
        "FLASHSALE_INFRA": "external",
        **(extra_env or {}),
    }
    processor = Service("processor", s)
    projector = Service("projector", s)
    if start_processor:
        processor.start(env)
    projector.start(env)
    return Pipeline(s, endpoints, processor, projector, env)


def partition_of(sku: str, partitions: int) -> int:
    """The partition a SKU's records land on (murmur2, as every producer of ours uses)."""
    from aiokafka.partitioner import DefaultPartitioner

    parts = list(range(partitions))
    return int(DefaultPartitioner()(sku.encode(), parts, parts))


@contextmanager
def with_payments(settings: Settings, endpoints: Endpoints, uid: str,
                  slow_s: float = 0) -> Iterator[Pipeline]:  # fmt: skip
    """A pipeline plus the payment service (its stub provider answers after ``slow_s`` for
    a "slow" user), stopped afterwards: for tests of orders held for payment."""
    p = start_pipeline(settings, endpoints, uid, {"FLASHSALE_STUB_SLOW_S": str(slow_s)})
    payments = Service("payments", p.settings)
    assert payments.start(p.env)
    try:
        yield p
    finally:
        payments.stop()
        p.stop()
