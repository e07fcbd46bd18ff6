"""Where a local cluster's nodes listen, and the refusal to mix cluster sizes in one state dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.errors import InfraError
from infra.kafka_cluster import KafkaCluster, node_dirs


def test_three_nodes_get_ports_ids_and_one_quorum(tmp_path: Path):
    c = KafkaCluster.local(tmp_path, 20000, 20001, 3)
    assert [(n.node_id, n.port, n.controller_port) for n in c.nodes] == [
        (1, 20000, 20001), (2, 20002, 20003), (3, 20004, 20005),
    ]  # fmt: skip
    assert {n.voters for n in c.nodes} == {"1@127.0.0.1:20001,2@127.0.0.1:20003,3@127.0.0.1:20005"}
    assert {n.replication for n in c.nodes} == {3}
    assert c.homes == [tmp_path / "kafka-1", tmp_path / "kafka-2", tmp_path / "kafka-3"]
    alone = KafkaCluster.local(tmp_path, 20000, 20001)
    assert alone.homes == [tmp_path / "kafka"] and alone.nodes[0].voters == ""


def _formatted(home: Path, node_id: int) -> None:
    (home / "data").mkdir(parents=True)
    (home / "data" / "meta.properties").write_text(f"node.id={node_id}\ncluster.id=abc\n")


def test_another_cluster_size_in_the_same_state_dir_is_refused(tmp_path: Path):
    _formatted(tmp_path / "kafka", 1)
    (tmp_path / "kafka-fx1").mkdir()  # not a node directory
    with pytest.raises(InfraError, match=r"another size.*make clean"):
        KafkaCluster.local(tmp_path, 20000, 20001, 3).refuse_other_layouts()
    KafkaCluster.local(tmp_path, 20000, 20001, 1).refuse_other_layouts()  # its own: fine
    assert node_dirs(tmp_path) == [tmp_path / "kafka"]


def test_a_bigger_cluster_or_a_wiped_voter_is_refused(tmp_path: Path):
    for i in (1, 2, 3):
        _formatted(tmp_path / f"kafka-{i}", i)
    KafkaCluster.local(tmp_path, 20000, 20001, 3).refuse_other_layouts()  # as formatted: fine
    with pytest.raises(InfraError, match=r"voters are fixed"):  # grown from 3 to 4
        KafkaCluster.local(tmp_path, 20000, 20001, 4).refuse_other_layouts()
    with pytest.raises(InfraError, match=r"another size"):  # shrunk from 3 to 2
        KafkaCluster.local(tmp_path, 20000, 20001, 2).refuse_other_layouts()
    (tmp_path / "kafka-2" / "data" / "meta.properties").unlink()  # a voter's data lost
    with pytest.raises(InfraError, match=r"kafka-2"):
        KafkaCluster.local(tmp_path, 20000, 20001, 3).refuse_other_layouts()
