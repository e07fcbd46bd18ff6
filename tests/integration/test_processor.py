"""The decision core on real Kafka and PostgreSQL: oversubscribed sales, poison, partitions."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from flashsale import input_audit
from flashsale.settings import Settings
from flashsale.topics import TopicNames
from infra.stack import Endpoints
from producers.commands import SkuAllocation, producer_config
from producers.identity import intent_id_for
from schemas.codec import SchemaRegistry
from tests.integration.pipeline import Pipeline, start_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(settings: Settings, endpoints: Endpoints) -> Iterator[Pipeline]:
    p = start_pipeline(settings, endpoints, uuid.uuid4().hex[:8])
    yield p
    p.stop()


def orders_for(dsn: str, sale_id: str, expected: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            n = conn.execute("SELECT count(*) FROM orders WHERE sale_id = %s", (sale_id,))
            count = int(n.fetchone()[0])  # type: ignore[index]
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.3)


def test_oversubscribed_sale_sells_exactly_the_allocation(pipeline: Pipeline, uid: str):
    sale, sku = f"over-{uid}", f"sku-over-{uid}"
    pipeline.open_sale(sale, [SkuAllocation(sku, 100, 2, 1)])
    producer = pipeline.producer()
    rng = random.Random(1)
    sends = [(f"u{rng.randrange(1500)}", f"k{i}") for i in range(4_700)]
    retries = [rng.choice(sends) for _ in range(300)]  # same user and key: the same intent
    futures = [producer.submit_intent(sale, sku, u, 1, k)[1] for u, k in sends + retries]
    producer.wait(futures)
    expected = {intent_id_for(u, sale, sku, k) for u, k in sends}

    audit = pipeline.audit(sale)
    missing = audit.wait_for(expected, timeout=120)
    time.sleep(1)
    audit.poll(1)
    report = audit.report()
    audit.close()

    assert missing == set(), f"{len(missing)} intents never got a decision"
    assert set(audit.decisions) == expected, "a decision for an intent nobody sent"
    assert report.accepted_units == {sku: 100}, "exactly the allocation is sold"
    assert report.oversold == 0 and report.user_limit_breaches == 0
    assert report.conflicting == [], "an intent got two different decisions"
    assert report.repeated_decisions == 0, "a retry got a second decision"
    assert not report.sequence_gaps
    # The stressors really happened: every retry reached the writer and was recognised as a
    # repeat (no decision of its own), and users asked for more than their limit allows.
    account = input_audit.account(pipeline.endpoints.bootstrap, pipeline.names, sale)
    assert account.holds, account
    assert (account.decided, account.repeats) == (len(expected), len(retries))
    with pytest.raises(input_audit.IncompleteRead, match="not read to their end offsets"):
        input_audit.account(pipeline.endpoints.bootstrap, pipeline.names, sale, timeout=0)
    assert report.rejected_by_reason.get("SOLD_OUT", 0) > 4000
    assert orders_for(pipeline.endpoints.dsn, sale, 100) == 100


def test_poison_records_go_to_dead_letters_and_the_partition_keeps_flowing(
    pipeline: Pipeline, uid: str
):
    sale, sku = f"poison-{uid}", f"sku-poison-{uid}"
    pipeline.open_sale(sale, [SkuAllocation(sku, 10, 5, 5)])
    registry = SchemaRegistry.load_default()
    raw = Producer(producer_config(pipeline.endpoints.bootstrap))
    topic = pipeline.names.sku_commands
    wrong_schema = registry.encode("CloseSale", {
        "event_id": "x", "correlation_id": None, "producer": "t", "occurred_at": 0,
        "sale_id": sale, "sku": sku, "reason": "r"})[:10] + b"\x00" * 3  # fmt: skip
    decision_on_input = registry.encode("IntentRejected", {
        "event_id": "x", "correlation_id": None, "producer": "t", "occurred_at": 0,
        "intent_id": "i", "sale_id": sale, "sku": sku, "user_id": "u", "quantity": 1,
        "reason": "SOLD_OUT", "detail": "", "remaining": 0, "sequence": 1, "decided_at": 0,
    })  # fmt: skip
    poison = [os.urandom(40), wrong_schema, decision_on_input]
    for value in poison:
        raw.produce(topic, value, key=sku.encode())
    assert raw.flush(10) == 0

    producer = pipeline.producer()
    negative = producer.post_intent(sale, sku, "neg-user", -3, "neg")
    after = [producer.post_intent(sale, sku, f"after-{i}", 1, "k") for i in range(3)]

    audit = pipeline.audit(sale)
    assert audit.wait_for({negative, *after}, timeout=60) == set()
    report = audit.report()
    audit.close()
    neg = audit.decisions[negative][1]
    assert neg["_name"] == "IntentRejected" and neg["reason"] == "INVALID_QUANTITY"
    assert report.accepted == 3, "intents after the poison records were decided"

    dead = read_all(pipeline.endpoints.bootstrap, pipeline.names.dead_letters)
    mine = [m for m in dead if m.key() == sku.encode()]
    assert [m.value() for m in mine] == poison
    reasons = [dict(m.headers())["dlq.reason"].decode() for m in mine]
    assert reasons[0] in ("bad-magic", "unknown-fingerprint")
    assert reasons[1] == "truncated-or-corrupt"
    assert reasons[2] == "wrong-schema"
    for m in mine:
        h = dict(m.headers())
        assert h["dlq.source.topic"].decode() == topic
        assert int(h["dlq.source.offset"]) >= 0 and int(h["dlq.source.partition"]) >= 0


def read_all(bootstrap: str, topic: str) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                  "enable.auto.commit": False})  # fmt: skip
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out, idle = [], 0
    while idle < 3:
        batch = [m for m in c.consume(1000, 0.5) if not m.error()]
        idle = 0 if batch else idle + 1
        out += batch
    c.close()
    return out


def test_our_producers_and_faust_agree_on_every_keys_partition(pipeline: Pipeline, uid: str):
    """confluent-kafka (murmur2_random) must place keys where aiokafka/Faust/Java would."""
    n = pipeline.settings.partitions
    topic = f"t-partitions-{uid}"
    admin = AdminClient({"bootstrap.servers": pipeline.endpoints.bootstrap})
    admin.create_topics([NewTopic(topic, n, 1)])[topic].result(30)
    producer = Producer({**producer_config(pipeline.endpoints.bootstrap)})
    placed: dict[bytes, int] = {}
    keys = [f"agree-{uid}-{i}".encode() for i in range(500)]

    def record(err: object, msg: Any) -> None:
        placed[msg.key()] = msg.partition()

    for key in keys:
        producer.produce(topic, b"not-a-record", key=key, on_delivery=record)
    assert producer.flush(10) == 0
    faust_partitioner = DefaultPartitioner()
    parts = list(range(n))
    disagree = [k for k in keys if placed[k] != faust_partitioner(k, parts, parts)]
    assert len(set(placed.values())) == n, "keys should spread over every partition"
    assert disagree == []


def test_settled_sale_frees_its_state_and_never_redecides_even_after_a_restart(
    pipeline: Pipeline, uid: str
):
    sale, sku = f"settle-{uid}", f"sku-settle-{uid}"
    pipeline.open_sale(sale, [SkuAllocation(sku, 5, 1, 1)])
    producer = pipeline.producer()
    first = [producer.post_intent(sale, sku, f"u{i}", 1, "k") for i in range(8)]
    audit = pipeline.audit(sale)
    assert audit.wait_for(set(first), timeout=60) == set()

    producer.close_sale(sale, [sku])
    producer.settle_sale(sale, [sku])
    again = producer.post_intent(sale, sku, "u0", 1, "k")  # a retry of an accepted intent
    late = producer.post_intent(sale, sku, "late-user", 1, "k")
    assert again == first[0]
    assert audit.wait_for({late}, timeout=60) == set()
    # The settled sale's digests come back from the store after a restart.
    pipeline.processor.stop()
    pipeline.processor.start(pipeline.env)
    producer.post_intent(sale, sku, "u1", 1, "k")  # another retry, now of a settled sale
    later = producer.post_intent(sale, sku, "later-user", 1, "k")
    assert audit.wait_for({later}, timeout=90) == set()
    time.sleep(1)
    audit.poll(1)
    report = audit.report()
    audit.close()
    assert report.conflicting == [] and report.repeated_decisions == 0
    assert audit.decisions[late][1]["reason"] == "SALE_ENDED"
    assert audit.decisions[later][1]["reason"] == "SALE_ENDED"
    assert report.accepted_units == {sku: 5} and not report.sequence_gaps
    account = input_audit.account(pipeline.endpoints.bootstrap, pipeline.names, sale)
    assert account.holds and account.repeats == 2


def test_missing_changelog_topic_is_created_before_the_worker_consumes(
    settings: Settings, endpoints: Endpoints, uid: str
):
    ns = dataclasses.replace(settings, namespace=f"t-cl-{uid}")
    changelog = TopicNames.of(ns).ledger_changelog
    admin = AdminClient({"bootstrap.servers": endpoints.bootstrap})
    pipeline = start_pipeline(
        settings, endpoints, f"cl-{uid}", start_processor=False, unprovisioned=(changelog,)
    )
    assert pipeline.settings.namespace == ns.namespace
    assert changelog not in admin.list_topics(timeout=10).topics, "the test provisioned it"
    pipeline.processor.start(pipeline.env)
    try:
        pipeline.open_sale("s", [SkuAllocation("sku-cl", 10, 1, 1)])
        producer = pipeline.producer()
        ids = {producer.post_intent("s", "sku-cl", f"u{i}", 1, "k") for i in range(20)}
        audit = pipeline.audit("s")
        assert audit.wait_for(ids, timeout=90) == set()
        audit.close()
        topics = admin.list_topics(timeout=10).topics
        assert len(topics[changelog].partitions) == pipeline.settings.partitions
    finally:
        pipeline.stop()


def test_lost_state_is_detected_and_rebuilt_from_the_command_log(
    settings: Settings, endpoints: Endpoints, uid: str
):
    """RocksDB wiped *and* changelog emptied (or an older layout): rebuilt, never misread."""
    pipeline = start_pipeline(settings, endpoints, f"lost-{uid}")
    try:
        sale, sku = f"lost-{uid}", f"sku-lost-{uid}"
        pipeline.open_sale(sale, [SkuAllocation(sku, 30, 1, 1)])
        producer = pipeline.producer()
        before = [producer.post_intent(sale, sku, f"u{i}", 1, "k") for i in range(50)]
        audit = pipeline.audit(sale)
        assert audit.wait_for(set(before), timeout=90) == set()
        pipeline.processor.stop()
        shutil.rmtree(pipeline.settings.state_dir / "processor", ignore_errors=True)
        changelog = TopicNames.of(pipeline.settings).ledger_changelog
        admin = AdminClient({"bootstrap.servers": endpoints.bootstrap})
        admin.delete_topics([changelog])[changelog].result(30)
        deadline = time.monotonic() + 30
        while changelog in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
            time.sleep(0.5)

        pipeline.processor.start(pipeline.env)  # recreates the (empty) changelog
        retries = [producer.post_intent(sale, sku, f"u{i}", 1, "k") for i in range(50)]
        after = [producer.post_intent(sale, sku, f"v{i}", 1, "k") for i in range(20)]
        assert retries == before
        assert audit.wait_for(set(after), timeout=120) == set()
        time.sleep(1.5)
        audit.poll(1)
        report = audit.report()
        audit.close()
        assert report.repeated_decisions == 0, "a retry was decided again after the rebuild"
        assert report.accepted_units == {sku: 30} and report.conflicting == []
        assert all(audit.decisions[i][1]["reason"] == "SOLD_OUT" for i in after)
        log = pipeline.processor.logfile.read_text()
        assert '"state.rebuilding"' in log and '"state.rebuilt"' in log
    finally:
        pipeline.stop()
