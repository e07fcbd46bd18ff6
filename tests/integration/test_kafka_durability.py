"""Kafka round trips with the settings that lose nothing (acks=all, idempotence, read_committed)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra.stack import Endpoints


def make_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)


def consume_all(bootstrap: str, topic: str, group: str, expected: int) -> list[tuple[int, bytes]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    got: list[tuple[int, bytes]] = []
    idle = 0
    try:
        while idle < 20 and len(got) < expected + 1:
            batch = consumer.consume(1000, timeout=0.5)
            idle = 0 if batch else idle + 1
            for msg in batch:
                assert msg.error() is None, msg.error()
                got.append((msg.partition(), msg.value()))
            if len(got) >= expected:
                idle += 5  # drain briefly to catch duplicates, then stop
    finally:
        consumer.close()
    return got


def test_ten_thousand_records_survive_in_order_without_duplicates(endpoints: Endpoints, uid: str):
    topic = f"t-durable-{uid}"
    make_topic(endpoints.bootstrap, topic, 6)
    producer = Producer(
        {
            "bootstrap.servers": endpoints.bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "linger.ms": 5,
        }
    )
    sent = [f"{i:06d}".encode() for i in range(10_000)]
    failures: list[str] = []
    for i, value in enumerate(sent):
        producer.produce(
            topic,
            value,
            key=f"k{i % 97}".encode(),
            on_delivery=lambda err, _m: failures.append(str(err)) if err else None,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert failures == []

    got = consume_all(endpoints.bootstrap, topic, f"g-{uid}", len(sent))
    values = [v for _, v in got]
    assert len(values) == len(set(values)), "duplicates were delivered"
    assert set(values) == set(sent)
    by_partition: dict[int, list[bytes]] = defaultdict(list)
    for partition, value in got:
        by_partition[partition].append(value)
    assert len(by_partition) == 6, "records should spread over all partitions"
    for partition, values_in_p in by_partition.items():
        assert values_in_p == sorted(values_in_p), f"partition {partition} out of order"


def test_confluent_aborted_transaction_is_invisible(endpoints: Endpoints, uid: str):
    topic = f"t-txn-ck-{uid}"
    make_topic(endpoints.bootstrap, topic, 3)
    producer = Producer(
        {
            "bootstrap.servers": endpoints.bootstrap,
            "transactional.id": f"tx-{uid}",
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted-1", key=b"a")
    producer.produce(topic, b"aborted-2", key=b"b")
    producer.flush(10)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"committed-1", key=b"a")
    producer.produce(topic, b"committed-2", key=b"b")
    producer.commit_transaction(30)

    values = sorted(v for _, v in consume_all(endpoints.bootstrap, topic, f"g-{uid}", 2))
    assert values == [b"committed-1", b"committed-2"]


def test_aiokafka_aborted_transaction_is_invisible(endpoints: Endpoints, uid: str):
    """Faust's driver: its exactly-once mode rests on this working against our broker."""
    topic = f"t-txn-aio-{uid}"
    make_topic(endpoints.bootstrap, topic, 3)

    async def scenario() -> list[bytes]:
        producer = AIOKafkaProducer(
            bootstrap_servers=endpoints.bootstrap,
            transactional_id=f"aio-{uid}",
            enable_idempotence=True,
            acks="all",
        )
        await producer.start()
        try:
            await producer.begin_transaction()
            await producer.send_and_wait(topic, b"aborted", key=b"a")
            await producer.abort_transaction()
            async with producer.transaction():
                await producer.send_and_wait(topic, b"committed", key=b"a")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=endpoints.bootstrap,
            group_id=f"g-{uuid.uuid4().hex}",
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        got: list[bytes] = []
        try:
            for _ in range(10):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got += [r.value for r in records]
        finally:
            await consumer.stop()
        return got

    assert asyncio.run(scenario()) == [b"committed"]
