"""Three real Kafka nodes on loopback: every topic (internal ones too) on all three with
min.insync 2, and an acknowledged write surviving its partition leader's SIGKILL."""

from __future__ import annotations

import os
import signal
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from flashsale.settings import Settings
from flashsale.topics import catalogue
from infra import processes, provision
from infra.kafka_cluster import KafkaCluster
from tests.integration.test_kafka_durability import consume_all


def test_catalogue_and_internal_topics_are_on_three_nodes_with_min_insync_two(
    settings: Settings, private_cluster: KafkaCluster, uid: str
):
    s = Settings.from_env({**os.environ, "FLASHSALE_CLUSTER": "3",
                           "FLASHSALE_NAMESPACE": f"t-{uid}"})  # fmt: skip
    created, drift = provision.ensure_topics(private_cluster.bootstrap, catalogue(s))
    assert len(created) == len(catalogue(s)) and drift == []
    admin = AdminClient({"bootstrap.servers": private_cluster.bootstrap})
    # the group and transaction coordinators' topics exist once a group or producer used them
    consume_all(private_cluster.bootstrap, created[0], f"g-{uid}", 0)
    tx = Producer({"bootstrap.servers": private_cluster.bootstrap, "transactional.id": uid})
    tx.init_transactions(30)
    topics = admin.list_topics(timeout=10).topics
    for name in [*created, "__consumer_offsets", "__transaction_state"]:
        replicas = {len(p.replicas) for p in topics[name].partitions.values()}
        isrs = {len(p.isrs) for p in topics[name].partitions.values()}
        assert replicas == {3} and isrs == {3}, (name, replicas, isrs)
    res = ConfigResource(ConfigResource.Type.TOPIC, created[0])
    config = admin.describe_configs([res])[res].result()
    assert config["min.insync.replicas"].value == "2"
    assert config["unclean.leader.election.enable"].value == "false"


def test_an_acknowledged_write_survives_its_leaders_sigkill(
    private_cluster: KafkaCluster, uid: str
):
    topic = f"t-cluster-{uid}"
    admin = AdminClient({"bootstrap.servers": private_cluster.bootstrap})
    from confluent_kafka.admin import NewTopic

    admin.create_topics([NewTopic(topic, 1, 3, config={"min.insync.replicas": "2"})])[topic].result(
        30
    )
    producer = Producer({"bootstrap.servers": private_cluster.bootstrap, "acks": "all",
                         "enable.idempotence": True})  # fmt: skip
    acked: list[bytes] = []
    sent = [f"{i:05d}".encode() for i in range(2000)]
    for v in sent:
        producer.produce(topic, v, on_delivery=lambda e, m: e is None and acked.append(m.value()))
    assert producer.flush(30) == 0
    assert acked == sent
    leader = admin.list_topics(topic, timeout=10).topics[topic].partitions[0].leader
    node = private_cluster.node(leader)
    pid = node.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert processes.wait_until(lambda: not processes.alive(pid), 10)
    try:
        survivors = ",".join(n.bootstrap for n in private_cluster.nodes if n is not node)
        # the dead node is fenced after its broker session (9 s); a new leader serves then
        got = _read(survivors, topic, len(sent), timeout=60)
        assert got == sent  # all of them, once each, in order, from the others
        after = AdminClient({"bootstrap.servers": survivors}).list_topics(topic, timeout=10)
        assert after.topics[topic].partitions[0].leader not in (leader, -1)
    finally:
        node.pidfile.unlink(missing_ok=True)
        private_cluster.start()  # the node rejoins; the module's other tests see three


def _read(bootstrap: str, topic: str, expected: int, timeout: float) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused",
                         "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is None:
                    got.append(msg.value())
        got += [m.value() for m in consumer.consume(1000, timeout=1.0) if m.error() is None]
    finally:
        consumer.close()
    return got
