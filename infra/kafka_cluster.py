"""One Kafka node, or several on loopback as one KRaft cluster (``FLASHSALE_CLUSTER=3``).

Each node is broker and controller; all are voters, so the cluster keeps working while a
majority runs. Node ``i`` (from 1) listens on ``port + 2(i-1)`` and its controller on
``controller_port + 2(i-1)``; its files live in ``state_dir/kafka-<i>`` (one node alone
keeps ``state_dir/kafka``). Topics get replication factor ``min(3, nodes)`` and
``min.insync.replicas`` 2 (settings), so an acknowledged write is on two nodes.
"""

from __future__ import annotations

import functools
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from infra import processes
from infra.errors import InfraError
from infra.kafka import LocalKafka, new_cluster_id

_NODE_DIR = re.compile(r"^kafka(-\d+)?$")


@dataclass(frozen=True)
class KafkaCluster:
    nodes: tuple[LocalKafka, ...]

    @classmethod
    def local(
        cls,
        state_dir: Path,
        port: int,
        controller_port: int,
        size: int = 1,
        heap: str = "1g",
        jar_cache: Path | None = None,
        secrets: Path | None = None,
    ) -> KafkaCluster:
        """``secrets``: SASL and ACLs, with the passwords in that directory."""
        if size == 1:
            node = LocalKafka(state_dir, port, controller_port, heap, jar_cache, secrets=secrets)
            return cls((node,))
        ports = [(port + 2 * i, controller_port + 2 * i) for i in range(size)]
        return cls.on_ports(state_dir, ports, heap, jar_cache, secrets)

    @classmethod
    def on_ports(
        cls,
        state_dir: Path,
        ports: list[tuple[int, int]],
        heap: str = "1g",
        jar_cache: Path | None = None,
        secrets: Path | None = None,
    ) -> KafkaCluster:
        """A cluster of ``len(ports)`` nodes, node i on (broker, controller) ``ports[i-1]``."""
        voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
        rf = min(3, len(ports))
        node = functools.partial(LocalKafka, state_dir, heap=heap, jar_cache=jar_cache,
                                 voters=voters, replication=rf, secrets=secrets)  # fmt: skip
        return cls(tuple(node(p, c, node_id=i + 1, name=f"kafka-{i + 1}")
                         for i, (p, c) in enumerate(ports)))  # fmt: skip

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def homes(self) -> list[Path]:
        return [n.home for n in self.nodes]

    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id - 1]

    def pids(self) -> list[int]:
        """The pids of the nodes that run."""
        return [p for p in (n.pid() for n in self.nodes) if p is not None]

    def pid(self) -> int | None:
        """Node 1's pid (the whole cluster's when it is one node)."""
        return self.nodes[0].pid()

    def answers(self, timeout: float = 2.0) -> bool:
        """True when every node answers and is registered."""
        return all(n.answers(timeout) for n in self.nodes)

    def start(self) -> bool:
        """Start the nodes that do not run (all before waiting: a quorum forms only once a
        majority runs), then wait until each answers. True if any was started."""
        self.refuse_other_layouts()
        cluster_id = self._cluster_id()
        started = [n.launch(cluster_id) for n in self.nodes]
        for n in self.nodes:
            n.wait_ready()
        return any(started)

    def stop(self) -> bool:
        """Stop every node; True if any ran. SIGTERM goes to all at once: one at a time,
        the last would wait for a quorum that has already gone."""
        return stop_nodes(list(self.nodes))

    def _cluster_id(self) -> str | None:
        """The id to format new nodes with: None for one node (it formats itself), else a
        new one (``refuse_other_layouts`` made sure no node is formatted yet)."""
        return None if len(self.nodes) == 1 else new_cluster_id()

    def refuse_other_layouts(self) -> None:
        """Refuse to start beside data from another number of nodes in the same state
        directory: PostgreSQL and the writer's tables there remember that cluster's log."""
        state_dir = self.nodes[0].state_dir
        ours = {n.home for n in self.nodes}
        formatted = [bool(_meta(n.home)) for n in self.nodes]
        if any(formatted) and not all(formatted):
            # The quorum's voters are fixed when the cluster is formatted: a node added later
            # (a bigger FLASHSALE_CLUSTER) or formatted again (its data deleted) would join a
            # quorum that does not list it, or vote with its Raft log lost.
            fresh = [str(n.home) for n, f in zip(self.nodes, formatted, strict=True) if not f]
            raise InfraError(
                f"the Kafka cluster in {state_dir} was formatted with other nodes than the "
                f"{len(self.nodes)} asked for (FLASHSALE_CLUSTER), or lost a node's data "
                f"({', '.join(fresh)}); its voters are fixed: delete all local data with "
                "`make clean` (or choose another FLASHSALE_STATE_DIR) first"
            )
        for d in node_dirs(state_dir):
            if d not in ours and _meta(d):
                raise InfraError(
                    f"{d} holds a Kafka of another size than the {len(self.nodes)} node(s) "
                    f"asked for (FLASHSALE_CLUSTER); the projections and the writer's tables "
                    f"in {state_dir} belong to that log. Stop it and delete all local data "
                    "with `make clean` (or choose another FLASHSALE_STATE_DIR) first"
                )


def running_nodes(state_dir: Path) -> list[LocalKafka]:
    """Every node of any size that runs from ``state_dir`` (``make down`` stops them all,
    whatever FLASHSALE_CLUSTER says)."""
    nodes = (LocalKafka(state_dir, 0, 0, name=d.name) for d in node_dirs(state_dir))
    return [n for n in nodes if n.pid() is not None]


def node_dirs(state_dir: Path) -> list[Path]:
    """The Kafka node directories in ``state_dir``, of any cluster size."""
    return [d for d in sorted(state_dir.glob("kafka*")) if _NODE_DIR.match(d.name)]


def stop_nodes(nodes: list[LocalKafka]) -> bool:
    """SIGTERM every running node at once, then wait for each (SIGKILL after its grace)."""
    running = [(n, n.pid()) for n in nodes]
    for _, pid in running:
        if pid is not None:
            processes.signal_group(pid, signal.SIGTERM)
    for n, pid in running:
        processes.stop_tracked(pid, n.pidfile, grace=45.0)
    return any(pid is not None for _, pid in running)


def _meta(home: Path) -> dict[str, str]:
    try:
        text = (home / "data" / "meta.properties").read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
