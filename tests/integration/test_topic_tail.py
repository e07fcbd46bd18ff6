"""`TopicTail` against the real broker: it starts at the records stamped from a given time
(the demo's sale logs poll from the sale's opening, not from the topic's start) and each read
returns only what was appended since the last."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from flashsale.input_audit import TopicTail, read_topic
from infra.stack import Endpoints


@pytest.fixture
def topic(endpoints: Endpoints, uid: str) -> Iterator[str]:
    name = f"t-{uid}.tail"
    admin = AdminClient({"bootstrap.servers": endpoints.bootstrap})
    admin.create_topics(
        [
            NewTopic(
                name,
                num_partitions=2,
                replication_factor=1,
                # stamped in 2023: kept whatever the broker's time-based retention says
                config={"message.timestamp.type": "CreateTime", "retention.ms": "-1"},
            )
        ]
    )[name].result()
    try:
        yield name
    finally:
        admin.delete_topics([name])[name].result()


def _send(bootstrap: str, topic: str, values: list[str], at_ms: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, value in enumerate(values):
        producer.produce(topic, value.encode(), partition=i % 2, timestamp=at_ms)
    assert producer.flush(10) == 0


def test_a_tail_from_a_time_skips_older_records_and_reads_only_what_is_new(
    endpoints: Endpoints, topic: str
):
    t0 = 1_700_000_000_000
    _send(endpoints.bootstrap, topic, ["old-1", "old-2", "old-3"], t0)
    _send(endpoints.bootstrap, topic, ["new-1", "new-2"], t0 + 600_000)
    tail = TopicTail(endpoints.bootstrap, topic, True, since_ms=t0 + 300_000)
    try:
        assert sorted(m.value().decode() for m in tail.read(10)) == ["new-1", "new-2"]
        assert tail.read(10) == []  # nothing appended since
        _send(endpoints.bootstrap, topic, ["later"], t0 + 900_000)
        assert [m.value().decode() for m in tail.read(10)] == ["later"]
    finally:
        tail.close()
    everything = read_topic(endpoints.bootstrap, topic, True, 10)
    assert len(everything) == 6
    # From a time past every record: it starts at the ends and sees only what comes next.
    tail = TopicTail(endpoints.bootstrap, topic, True, since_ms=t0 + 3_600_000)
    try:
        assert tail.read(10) == []
        _send(endpoints.bootstrap, topic, ["last"], t0)  # stamped early, appended after
        assert [m.value().decode() for m in tail.read(10)] == ["last"]
    finally:
        tail.close()
