"""The edge's asynchronous acknowledgements against the real broker.

``submit_intent_async`` resolves on the event loop only once Kafka acknowledged the record
(acks=all), to the partition, offset and log-append time the record really has; an intent
Kafka never acknowledges fails with ``NotAcknowledged``, and a wait abandoned by its request
never breaks the others.
"""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infra.stack import Endpoints
from producers.commands import Appended, CommandProducer, NotAcknowledged
from schemas.codec import SchemaRegistry


def _records(bootstrap: str, topic: str) -> dict[str, tuple[int, int, int]]:
    """intent id -> (partition, offset, timestamp) of every record in ``topic``."""
    registry = SchemaRegistry.load_default()
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe", "log_level": 0})
    found: dict[str, tuple[int, int, int]] = {}
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p, 0) for p in partitions]
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1] for p in partitions
        }
        consumer.assign(tps)
        while sum(ends.values()) > len(found):
            for msg in consumer.consume(500, 1.0):
                assert msg.error() is None
                _, record = registry.decode(msg.value())
                found[record["intent_id"]] = (msg.partition(), msg.offset(), msg.timestamp()[1])
    finally:
        consumer.close()
    return found


def test_async_acks_resolve_to_where_kafka_put_the_record(endpoints: Endpoints, uid: str):
    topic = f"t-acks-{uid}"
    admin = AdminClient({"bootstrap.servers": endpoints.bootstrap})
    log_time = {"message.timestamp.type": "LogAppendTime"}  # as the command topic
    admin.create_topics([NewTopic(topic, 3, 1, config=log_time)])[topic].result(30)

    async def main() -> dict[str, Appended]:
        producer = CommandProducer(endpoints.bootstrap, "test-acks", topic=topic)
        producer.serve_acks_on(asyncio.get_running_loop())
        try:
            submitted = [
                producer.submit_intent_async("s", f"k{i % 7}", f"u{i}", 1, f"key-{i}")
                for i in range(500)
            ]
            # Reports served by another thread (flush, as close() does) reach the loop too.
            submitted += [
                producer.submit_intent_async("s", f"k{i % 7}", f"u{i}", 1, f"key-{i}")
                for i in range(500, 600)
            ]
            assert await asyncio.to_thread(producer.flush) == 0
            places = await asyncio.gather(*(f for _, f in submitted))
            return {intent: place for (intent, _), place in zip(submitted, places, strict=True)}
        finally:
            await asyncio.to_thread(producer.close)

    acked = asyncio.run(main())
    in_topic = _records(endpoints.bootstrap, topic)
    assert len(acked) == 600 and set(acked) == set(in_topic)
    assert all(
        (acked[i].partition, acked[i].offset, acked[i].log_time_ms) == in_topic[i] for i in acked
    )
    assert len({a.partition for a in acked.values()}) == 3


def test_an_intent_kafka_never_acknowledges_fails_and_an_abandoned_wait_is_skipped(
    endpoints: Endpoints, uid: str
):
    async def main() -> None:
        # A topic that does not exist (and is not auto-created): nothing is ever acknowledged.
        producer = CommandProducer(
            endpoints.bootstrap, "test-acks", timeout_ms=1500, topic=f"t-missing-{uid}"
        )
        producer.serve_acks_on(asyncio.get_running_loop())
        try:
            _, abandoned = producer.submit_intent_async("s", "k", "u1", 1, "key-1")
            _, waited = producer.submit_intent_async("s", "k", "u2", 1, "key-2")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(abandoned, 0.1)  # the request gives up first
            with pytest.raises(NotAcknowledged, match="not acknowledged"):
                await asyncio.wait_for(waited, 10)
            assert abandoned.cancelled()
        finally:
            await asyncio.to_thread(producer.close)

    asyncio.run(main())
