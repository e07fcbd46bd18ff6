"""The whole flashsale on a three-node Kafka cluster (RF 3, min.insync 2), secured as
``make up CLUSTER=3`` is (SASL, ACLs, signed intents), under broker faults, mid-sale: one
node SIGKILLed and restarted, two of three stopped, and a partition's leader moved while the
writer holds an open transaction on it."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, ElectionType, TopicPartition
from confluent_kafka.admin import NewTopic

from flashsale.kafka_auth import AdminClient, Consumer, Producer
from flashsale.settings import Settings
from infra import processes
from infra.kafka_cluster import KafkaCluster, stop_nodes
from infra.stack import Endpoints
from tests.faults.checks import verify
from tests.faults.harness import Hit, Sale, System, now_ms, open_sale, plan_sale, run_sale
from tests.faults.harness import whole_system as _whole_system
from tests.faults.test_service_faults import _growing, _retried, restart_the_dead
from tests.faults.test_writer_faults import _stopped
from tests.integration.pipeline import partition_of

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.destructive]

RF3 = {"FLASHSALE_REPLICATION_FACTOR": "3"}


@pytest.fixture
def cluster(secured_cluster: tuple[KafkaCluster, Settings]) -> Iterator[KafkaCluster]:
    """The module's cluster with all three nodes running (a scenario restarts what it stops)."""
    secured_cluster[0].start()
    yield secured_cluster[0]


@pytest.fixture
def cluster_settings(secured_cluster: tuple[KafkaCluster, Settings]) -> Settings:
    """The cluster's settings (RF 3, SASL), for every scenario of this module."""
    return secured_cluster[1]


def whole_system(settings: Settings, endpoints: Endpoints, cluster: KafkaCluster,
                 env: dict[str, str] | None = None):  # fmt: skip
    return _whole_system(settings, Endpoints(cluster.bootstrap, endpoints.dsn),
                         {**RF3, **(env or {})})  # fmt: skip


def _restored(system: System, cluster: KafkaCluster, hit: Hit) -> Hit:
    """Start the stopped nodes, then restart what exited meanwhile (the supervisor's job) for
    as long as a probe may still retry after their return."""
    cluster.start()
    hit.ended_ms = now_ms()
    hit.detail["restarted"] = restart_the_dead(system, 15)
    return hit


def leader(cluster: KafkaCluster, topic: str, partition: int) -> int:
    md = AdminClient({"bootstrap.servers": cluster.bootstrap}).list_topics(topic, timeout=10)
    return md.topics[topic].partitions[partition].leader


def test_one_broker_of_three_sigkilled_and_restarted_no_202_intent_is_lost(
    cluster_settings: Settings, endpoints: Endpoints, cluster: KafkaCluster
) -> None:
    settings = cluster_settings
    with whole_system(settings, endpoints, cluster) as system:
        sale = plan_sale()
        open_sale(system, sale)
        commands = system.pipeline.names.sku_commands
        partition = partition_of(sale.skus[0], settings.partitions)

        def kill_leader(system: System, sale: Sale) -> Hit:
            # the node leading the sale's first SKU's commands: the edge's writes and the
            # writer's reads of that partition surely meet the fault
            node = cluster.node(leader(cluster, commands, partition))
            pid = node.pid()
            assert pid is not None
            hit = Hit(now_ms(), detail={"node": node.node_id})
            queued = _growing(sale)
            os.kill(pid, signal.SIGKILL)
            assert processes.wait_until(lambda: not processes.alive(pid), 10)
            time.sleep(15)  # past the 9 s broker session: the others lead without it
            hit.detail["queued_while_down"] = _growing(sale) - queued
            hit.detail["new_leader"] = leader(cluster, commands, partition)
            node.pidfile.unlink(missing_ok=True)
            return _restored(system, cluster, hit)

        run_sale(system, sale, kill_leader, 0.2, concurrency=4, pace_s=0.05)
        verify(system, sale, "cluster: the leading broker of three SIGKILLed 15 s")
        hit = sale.hit
        assert hit is not None
        assert hit.detail["new_leader"] not in (hit.detail["node"], -1), hit.detail
        # two nodes of three hold min.insync: the sale went on meanwhile
        assert hit.detail["queued_while_down"] > 0, hit.detail


def test_two_brokers_of_three_stopped_the_edge_answers_503_never_202(
    cluster_settings: Settings, endpoints: Endpoints, cluster: KafkaCluster
) -> None:
    settings = cluster_settings
    with whole_system(settings, endpoints, cluster) as system:
        sale = plan_sale()
        open_sale(system, sale)

        def stop_two(system: System, sale: Sale) -> Hit:
            hit = Hit(now_ms())
            two = list(cluster.nodes[1:])
            stop_nodes(two)  # returns once both are gone
            time.sleep(1)  # an answer to a request acked just before is in by now
            queued, retried = _growing(sale), _retried(sale)
            time.sleep(12)
            hit.detail = {"queued_while_down": _growing(sale) - queued,
                          "retried_503": _retried(sale) - retried}  # fmt: skip
            return _restored(system, cluster, hit)

        run_sale(system, sale, stop_two, 0.2, concurrency=4, pace_s=0.05)
        verify(system, sale, "cluster: two brokers of three stopped 13 s")
        hit = sale.hit
        assert hit is not None
        # one node cannot make two in-sync copies: no 202 until they return, and 503s meanwhile
        assert hit.detail["queued_while_down"] == 0, hit.detail
        assert hit.detail["retried_503"] > 0, "the edge never answered 503"


def test_a_leader_change_while_the_writer_holds_an_open_transaction(
    cluster_settings: Settings, endpoints: Endpoints, cluster: KafkaCluster
) -> None:
    """The fault hook SIGSTOPs the writer with a batch's decisions sent and its transaction
    open; the decision partition's leadership then moves (a preferred-leader election, no node
    dies) and the writer is continued: its commit lands on the new leader, exactly once."""
    settings = cluster_settings
    sale = plan_sale()
    partition = partition_of(sale.skus[0], settings.partitions)
    env = {"FLASHSALE_FAULT": f"stop:before-commit:{partition}:150"}
    with whole_system(settings, endpoints, cluster, env) as system:
        decisions = system.pipeline.names.decisions
        tp = TopicPartition(decisions, partition)
        # Move the leadership off its preferred node first (a clean restart of that node),
        # so a preferred election can move it back while the transaction is open.
        preferred = cluster.node(leader(cluster, decisions, partition))
        preferred.stop()
        cluster.start()
        assert leader(cluster, decisions, partition) != preferred.node_id
        moved_off = restart_the_dead(system, 3)  # the writer probes patiently: none, surely
        open_sale(system, sale)

        def move_leader(system: System, _: Sale) -> Hit:
            pid = system.pipeline.processor.pid()
            assert pid is not None
            assert processes.wait_until(lambda: _stopped(pid), 120), "the hook never fired"
            before = leader(cluster, decisions, partition)
            hit = Hit(now_ms(), detail={"leader_before": before})
            if before != preferred.node_id:
                admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
                admin.elect_leaders(ElectionType.PREFERRED, [tp]).result(timeout=30)
                hit.detail["how"] = "preferred election"
            else:  # the broker's own leader rebalancing (every 300 s) moved it back already
                cluster.node(before).stop()  # a controlled shutdown hands its leadership on
                hit.detail["how"] = "controlled shutdown"
            hit.detail["leader_after"] = leader(cluster, decisions, partition)
            cluster.start()
            os.kill(pid, signal.SIGCONT)
            hit.ended_ms = now_ms()
            hit.detail["restarted"] = restart_the_dead(system, 5)
            return hit

        system.pipeline.env.pop("FLASHSALE_FAULT")  # a replacement runs without it
        run_sale(system, sale, move_leader, 0.0, pace_s=0.05)
        verify(system, sale, "cluster: leader change with the writer's transaction open")
        hit = sale.hit
        assert hit is not None
        assert moved_off == [], f"a node's clean restart stopped {moved_off}"
        [fired] = system.log_events("processor", "fault.injected")
        assert (fired["action"], fired["point"]) == ("stop", "before-commit")
        assert hit.detail["leader_after"] not in (hit.detail["leader_before"], -1), hit.detail


def test_an_acknowledged_write_survives_its_leaders_sigkill(cluster: KafkaCluster) -> None:
    """Below the whole system: 2,000 acks=all records, their leader SIGKILLed, all of them
    read back from the other two, once each, in order."""
    topic = f"t-cluster-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    new = NewTopic(topic, 1, 3, config={"min.insync.replicas": "2"})
    admin.create_topics([new])[topic].result(30)
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "acks": "all",
                         "enable.idempotence": True})  # fmt: skip
    acked: list[bytes] = []
    sent = [f"{i:05d}".encode() for i in range(2000)]
    for v in sent:
        producer.produce(topic, v, on_delivery=lambda e, m: e is None and acked.append(m.value()))
    assert producer.flush(30) == 0
    assert acked == sent
    leader = admin.list_topics(topic, timeout=10).topics[topic].partitions[0].leader
    node = cluster.node(leader)
    pid = node.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert processes.wait_until(lambda: not processes.alive(pid), 10)
    try:
        survivors = ",".join(n.bootstrap for n in cluster.nodes if n is not node)
        # the dead node is fenced after its broker session (9 s); a new leader serves then
        got = _read(survivors, topic, len(sent), timeout=60)
        assert got == sent  # all of them, once each, in order, from the others
        after = AdminClient({"bootstrap.servers": survivors}).list_topics(topic, timeout=10)
        assert after.topics[topic].partitions[0].leader not in (leader, -1)
    finally:
        node.pidfile.unlink(missing_ok=True)
        cluster.start()  # the node rejoins; the module's other tests see three


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
