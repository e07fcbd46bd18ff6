"""A real Apache Kafka node (KRaft combined mode: broker and controller) from Maven Central jars.

Alone it is the whole cluster; ``infra.kafka_cluster`` runs several as one cluster."""

from __future__ import annotations

import base64
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from flashsale import kafka_auth
from infra import processes
from infra.errors import CorruptState, InfraError
from infra.processes import find_binary

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).with_name("maven") / "pom.xml"
READY_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class LocalKafka:
    """The node's files live under ``state_dir/<name>``; the jars under ``state_dir/lib``.

    Alone (the defaults) it is node 1 and its own quorum; in a cluster each node gets its
    id, the quorum's voters (``1@host:port,2@...``) and the replication factor the cluster's
    internal topics use.
    """

    state_dir: Path
    port: int
    controller_port: int
    heap: str = "1g"
    jar_cache: Path | None = None  # defaults to state_dir/lib; tests share one cache
    node_id: int = 1
    name: str = "kafka"
    voters: str = ""  # empty: this node alone
    replication: int = 1
    secrets: Path | None = None  # with SASL and ACLs: the directory of the passwords

    @property
    def home(self) -> Path:
        return self.state_dir / self.name

    @property
    def lib(self) -> Path:
        return (self.jar_cache or self.state_dir / "lib") / f"kafka-{KAFKA_VERSION}"

    @property
    def pidfile(self) -> Path:
        return self.home / "broker.pid"

    @property
    def logfile(self) -> Path:
        return self.home / "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- set-up ---------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        """Resolve the broker jars with Maven once; later calls reuse them."""
        marker = self.lib / ".complete"
        if marker.exists():
            return self.lib
        mvn = find_binary("mvn", "FLASHSALE_MVN", "apt-get install -y maven")
        find_binary("java", "FLASHSALE_JAVA", "apt-get install -y openjdk-17-jre-headless")
        tmp = self.lib.with_name(self.lib.name + ".partial")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
            f"-Dkafka.version={KAFKA_VERSION}",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise InfraError(
                "Maven could not resolve the Kafka broker jars (is Maven Central reachable?):\n"
                + (result.stdout + result.stderr)[-2000:]
            )
        subprocess.run(["rm", "-rf", str(self.lib)], check=True)
        tmp.rename(self.lib)
        marker.write_text(KAFKA_VERSION + "\n")
        return self.lib

    def _java(self) -> str:
        return find_binary("java", "FLASHSALE_JAVA", "apt-get install -y openjdk-17-jre-headless")

    def _classpath(self) -> str:
        return f"{self.lib}/*"

    def _listeners(self) -> list[str]:
        if self.secrets is None:
            return [
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            ]
        # Clients and the other brokers on BROKER: the services with SCRAM (credentials kept
        # in the cluster's metadata by provisioning), the brokers and the provisioning
        # principal with PLAIN (they exist before any SCRAM credential can); the quorum on
        # CONTROLLER with PLAIN. Every request is authorized by ACLs; no ACL, no access.
        broker, admin = (kafka_auth.password(self.secrets, u) for u in ("broker", "admin"))
        plain = "org.apache.kafka.common.security.plain.PlainLoginModule required"
        return [
            f"listeners=BROKER://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=BROKER://127.0.0.1:{self.port}",
            "inter.broker.listener.name=BROKER",
            "listener.security.protocol.map=BROKER:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            f"sasl.enabled.mechanisms=PLAIN,{kafka_auth.SCRAM}",
            f"listener.name.broker.sasl.enabled.mechanisms=PLAIN,{kafka_auth.SCRAM}",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            "sasl.mechanism.controller.protocol=PLAIN",
            f'listener.name.broker.plain.sasl.jaas.config={plain} username="broker" '
            f'password="{broker}" user_broker="{broker}" user_{kafka_auth.ADMIN}="{admin}";',
            f"listener.name.broker.{kafka_auth.SCRAM.lower()}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            f'listener.name.controller.plain.sasl.jaas.config={plain} username="broker" '
            f'password="{broker}" user_broker="{broker}";',
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:broker;User:{kafka_auth.ADMIN}",
            "allow.everyone.if.no.acl.found=false",
        ]

    def _write_config(self) -> Path:
        data = self.home / "data"
        props = self.home / "server.properties"
        min_isr = min(2, self.replication)  # a write survives one node's loss once acked
        props.unlink(missing_ok=True)
        os.close(os.open(props, os.O_WRONLY | os.O_CREAT, 0o600))  # it may hold passwords
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={self.node_id}",
                    "controller.quorum.voters="
                    + (self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}"),
                    *self._listeners(),
                    "controller.listener.names=CONTROLLER",
                    f"log.dirs={data}",
                    "num.partitions=6",
                    "auto.create.topics.enable=false",
                    f"default.replication.factor={self.replication}",
                    f"min.insync.replicas={min_isr}",
                    f"offsets.topic.replication.factor={self.replication}",
                    "offsets.topic.num.partitions=12",
                    f"transaction.state.log.replication.factor={self.replication}",
                    f"transaction.state.log.min.isr={min_isr}",
                    "transaction.state.log.num.partitions=12",
                    "group.initial.rebalance.delay.ms=0",
                    "unclean.leader.election.enable=false",
                    # Faust's default commit interval needs a transaction timeout above it.
                    "transaction.max.timeout.ms=900000",
                    # Abort a paused worker's transaction within 2 s of its timeout (default
                    # 10 s), so fencing tests and real zombies resolve quickly.
                    "transaction.abort.timed.out.transaction.cleanup.interval.ms=2000",
                    "",
                ]
            )
        )
        (self.home / "log4j2.properties").write_text(
            "\n".join(
                [
                    "appender.out.type=Console",
                    "appender.out.name=out",
                    "appender.out.layout.type=PatternLayout",
                    "appender.out.layout.pattern=[%d] %p %m (%c)%n",
                    "rootLogger.level=INFO",
                    "rootLogger.appenderRef.out.ref=out",
                    "logger.kafka.name=kafka",
                    "logger.kafka.level=WARN",
                    "logger.org.name=org.apache.kafka",
                    "logger.org.level=WARN",
                    "logger.started.name=kafka.server.KafkaRaftServer",
                    "logger.started.level=INFO",
                    "",
                ]
            )
        )
        return props

    def _check_meta(self) -> bool:
        """True when storage is formatted; raise CorruptState when it is half-there."""
        data = self.home / "data"
        meta = data / "meta.properties"
        if not data.exists() or not any(data.iterdir()):
            return False
        try:
            fields = dict(
                line.split("=", 1) for line in meta.read_text().splitlines() if "=" in line
            )
        except (FileNotFoundError, UnicodeDecodeError, ValueError):
            fields = {}
        if fields.get("node.id") != str(self.node_id) or not fields.get("cluster.id"):
            raise CorruptState(
                f"Kafka state in {data} is corrupted ({meta} is missing or unreadable); "
                "wipe it with `make clean` (or `flashsale infra down --wipe`) and run `make up`"
            )
        return True

    def _format(self, props: Path, cluster_id: str | None) -> None:
        cluster_id = cluster_id or new_cluster_id()
        cmd = [self._java(), "-cp", self._classpath(), *self._log_opts()]
        cmd += ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise InfraError("formatting Kafka storage failed:\n" + result.stdout + result.stderr)

    def _log_opts(self) -> list[str]:
        return [f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}"]

    # -- lifecycle ------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The broker's pid when our broker is running."""
        pid = processes.read_pid(self.pidfile)
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return None
        return pid if str(self.home).encode() in cmdline else None

    def answers(self, timeout: float = 2.0) -> bool:
        """True when the node answers a metadata request and lists itself (registered)."""
        from flashsale.kafka_auth import AdminClient

        if processes.port_is_free(self.port):
            return False
        conf = {"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000, "log_level": 0}
        if self.secrets is not None:
            conf.update(kafka_auth.admin_conf(self.secrets))
        admin = AdminClient(conf)
        try:
            return self.node_id in admin.list_topics(timeout=timeout).brokers
        except Exception:  # KafkaException on timeout: not up yet
            return False

    def start(self) -> bool:
        """Start the broker unless it already runs; wait until it answers. True if started."""
        started = self.launch()
        self.wait_ready()
        return started

    def launch(self, cluster_id: str | None = None) -> bool:
        """Spawn the node unless it runs (formatting its storage with ``cluster_id`` when
        new); do not wait. A cluster's node answers only once a quorum of voters runs."""
        if self.pid() is not None:
            return False
        self.pidfile.unlink(missing_ok=True)
        processes.require_free_port(self.port, "Kafka", "FLASHSALE_KAFKA_PORT")
        processes.require_free_port(
            self.controller_port, "the Kafka controller", "FLASHSALE_KAFKA_CONTROLLER_PORT"
        )
        self.ensure_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        if not self._check_meta():
            self._format(props, cluster_id)
        argv = [
            self._java(), f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            *self._log_opts(), "-cp", self._classpath(), "kafka.Kafka", str(props),
        ]  # fmt: skip
        self.logfile.write_text("")
        processes.spawn(argv, self.logfile, self.pidfile, env=processes.base_env())
        return True

    def wait_ready(self) -> None:
        """Wait until the node answers and lists itself; raise naming why it did not."""
        # The pid just spawned, not ``pid()``: its command-line check can miss a JVM that is
        # still starting (its launcher may exec again), which read as "exited" once.
        pid = self.pid() or processes.read_pid(self.pidfile)
        started = time.monotonic()
        while time.monotonic() - started < READY_TIMEOUT_S:
            if pid is None or not processes.alive(pid):
                self.pidfile.unlink(missing_ok=True)
                tail = processes.log_tail(self.logfile)
                if "meta.properties" in tail or "cluster" in tail.lower():
                    raise CorruptState(
                        f"Kafka refused its state in {self.home / 'data'}; wipe it with "
                        f"`make clean` and run `make up`. Broker log:\n{tail}"
                    )
                raise InfraError(f"Kafka exited during start-up. Broker log:\n{tail}")
            if self.answers(timeout=1.0):
                return
            time.sleep(0.3)
        raise InfraError(
            f"Kafka node {self.node_id} did not answer within {READY_TIMEOUT_S:.0f}s; "
            f"see {self.logfile}"
        )

    def stop(self) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL). True if one was running."""
        return processes.stop_tracked(self.pid(), self.pidfile, grace=45.0)


def new_cluster_id() -> str:
    """A random KRaft cluster id that StorageTool cannot mistake for an option."""
    cluster_id = "-"
    while cluster_id.startswith("-"):  # 1 in 64 would read as an option to StorageTool
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return cluster_id
