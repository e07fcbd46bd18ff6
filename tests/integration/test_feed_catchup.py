"""An app server is sure a sale is unknown only once its feed has read to the log's committed
end (``producers.http.catchup``), against the real broker, with transactions as the writer
writes them: a committed batch, then one left open."""

from __future__ import annotations

import asyncio

from confluent_kafka import Producer

from infra.stack import Endpoints
from producers.http.catchup import CommittedEnds, caught_up
from producers.http.livefeed import DecisionFeed
from schemas.codec import SchemaRegistry
from tests.integration.test_kafka_durability import make_topic


def test_the_feed_catches_up_to_the_committed_end_and_not_past_an_open_transaction(
    endpoints: Endpoints, uid: str
) -> None:
    topic = f"t-catchup-{uid}"
    make_topic(endpoints.bootstrap, topic, 2)
    producer = Producer({"bootstrap.servers": endpoints.bootstrap,
                         "transactional.id": f"tx-catchup-{uid}"})  # fmt: skip
    producer.init_transactions(30)

    async def scenario() -> None:
        feed = DecisionFeed(endpoints.bootstrap, topic, SchemaRegistry.load_default())
        ends = CommittedEnds(endpoints.bootstrap, topic)
        await feed.start()
        try:
            assert await caught_up(feed, ends, 10)  # an empty log: read at once
            producer.begin_transaction()
            for p, n in ((0, 3), (1, 2)):
                for i in range(n):
                    producer.produce(topic, f"fact-{i}".encode(), partition=p)
            producer.commit_transaction(30)
            producer.begin_transaction()  # the writer's next batch, not committed yet
            producer.produce(topic, b"open", partition=0)
            producer.flush(30)
            # the records, then each transaction's marker: the open one ends the stable part
            assert await ends.now() == [4, 3]
            assert await caught_up(feed, ends, 10)
            assert feed.applied == 5 and feed.read_to([4, 3]) and not feed.read_to([5, 3])
            await feed.stop()  # a feed that reads no more is never sure
            producer.abort_transaction(30)
            producer.begin_transaction()
            producer.produce(topic, b"late", partition=1)
            producer.commit_transaction(30)
            assert not await caught_up(feed, ends, 1.0)
            assert feed.applied == 5
        finally:
            await feed.stop()
            await ends.close()

    asyncio.run(scenario())
