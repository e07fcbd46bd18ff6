"""Three real Kafka nodes on loopback: every topic (internal ones too) on all three with
min.insync 2. (An acknowledged write surviving its leader's SIGKILL: with the cluster fault
scenarios, ``tests/faults/test_cluster_faults.py``.)"""

from __future__ import annotations

import os

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from flashsale.settings import Settings
from flashsale.topics import catalogue
from infra import provision
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
