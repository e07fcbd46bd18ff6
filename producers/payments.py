"""The payment service: charges started payments, records each result, refunds voided ones.

It reads the decisions topic in its own consumer group (read_committed) and, per record:

- ``PaymentStarted``: charges the attempt at the provider (retrying while the provider does
  not answer) and writes the result to the command topic as ``RecordPayment``, for the
  SKU's writer to decide (paid, voided for a refund, or declined);
- ``PaymentVoided``: refunds the attempt (the writer refused a charge: late, or for a hold
  that is gone);
- ``OrderRefunded``: refunds the attempt that paid an order of a cancelled sale.

Offsets are committed only after a batch's charges are recorded (Kafka acknowledged) and
its refunds done, so a crash redoes the batch: the provider answers a repeated charge or
refund with what happened the first time, and the writer decides a repeated result once.
That is the reconciliation of attempts a crash left open: nothing is charged twice and no
started attempt is left without a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import uuid
from typing import Any

import structlog
from confluent_kafka import KafkaError

from flashsale.kafka_auth import Consumer
from flashsale.settings import Settings, env_number
from infra.signals import stop_on_signals
from processors.core.model import intent_of_order
from producers.payment_provider import PaymentProvider, ProviderTimeout
from schemas.codec import SchemaRegistry, UndecodableRecord

log = structlog.get_logger(__name__)
RETRY_S = 0.2


class PaymentService:
    """One consumer of the decisions topic, one provider, one command producer."""

    def __init__(self, provider: PaymentProvider, producer: Any) -> None:
        self.provider = provider
        self.producer = producer
        self.recorded = 0
        self.refunded = 0

    def handle(self, name: str, record: dict[str, Any], stopping: threading.Event) -> None:
        """Act on one decisions-topic record (everything but two kinds is ignored)."""
        if name == "PaymentStarted":
            charged = self._charge(record, stopping)
            if charged is None:
                return  # stopping: the batch is not committed, the next run charges again
            self.producer.order_command(
                "RecordPayment", record["sale_id"], record["sku"], order_id=record["order_id"],
                attempt_id=record["attempt_id"], succeeded=charged,
            )  # fmt: skip
            self.recorded += 1
            log.info("payments.recorded", intent_id=intent_of_order(record["order_id"]),
                     attempt_id=record["attempt_id"], order_id=record["order_id"],
                     charged=charged)  # fmt: skip
        elif name == "PaymentVoided" or name == "OrderRefunded":
            if self.provider.refund(record["attempt_id"]):
                self.refunded += 1
            why = record["detail"] if name == "PaymentVoided" else "the sale was cancelled"
            log.info("payments.refunded", intent_id=intent_of_order(record["order_id"]),
                     attempt_id=record["attempt_id"], order_id=record["order_id"],
                     detail=why)  # fmt: skip

    def _charge(self, record: dict[str, Any], stopping: threading.Event) -> bool | None:
        while not stopping.is_set():
            try:
                return self.provider.charge(record["attempt_id"], record["order_id"],
                                            record["user_id"])  # fmt: skip
            except ProviderTimeout as exc:
                log.warning("payments.provider_timeout", attempt_id=record["attempt_id"],
                            intent_id=intent_of_order(record["order_id"]),
                            error=str(exc))  # fmt: skip
                stopping.wait(RETRY_S)
        return None


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`flashsale payments`: charge, record and refund until SIGTERM/SIGINT."""
    from flashsale.service_metrics import ServiceMetrics
    from flashsale.topics import TopicNames
    from infra.stack import Stack
    from producers.commands import CommandProducer
    from producers.payment_provider import StubProvider

    ep = Stack(settings).endpoints()
    names = TopicNames.of(dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap))
    registry = SchemaRegistry.load_default()
    producer = CommandProducer(ep.bootstrap, "flashsale-payments", topic=names.sku_commands)
    slow_s = env_number(os.environ, "FLASHSALE_STUB_SLOW_S", 0.5, 0, 600)
    provider = StubProvider(ep.dsn, settings.namespace, slow_s)
    service = PaymentService(provider, producer)
    consumer = Consumer({"bootstrap.servers": ep.bootstrap,
                         "group.id": f"{settings.namespace}-payments",
                         "client.id": f"payments-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "isolation.level": "read_committed", "log_level": 3})  # fmt: skip
    consumer.subscribe([names.decisions])
    stopping = stop_on_signals(log, "payments.signal")
    log.info("payments.started", topic=names.decisions)
    metrics = ServiceMetrics(settings, "payments")
    metrics.stats(lambda: {"recorded": service.recorded, "refunded": service.refunded})
    metrics.lag(ep.bootstrap, f"{settings.namespace}-payments", [names.decisions])
    try:
        with metrics.serving():
            while not stopping.is_set():
                messages = consumer.consume(500, 0.5)
                for msg in messages:
                    if (error := msg.error()) is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("payments.consume_error", error=str(error))
                        continue
                    try:
                        name, record = registry.decode(msg.value() or b"")
                    except UndecodableRecord:
                        continue  # not ours to judge: the writer dead-letters its inputs
                    service.handle(name, record, stopping)
                    if stopping.is_set():
                        break
                if messages and not stopping.is_set():
                    consumer.commit(asynchronous=False)  # every charge of the batch is recorded
    finally:
        consumer.close()
        producer.close()
        provider.close()
        log.info("payments.stopped", recorded=service.recorded, refunded=service.refunded)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale payments` (the payment service in the foreground)."""
    p = sub.add_parser("payments", help="charge started payments, record results, refund")
    p.set_defaults(run=run)
