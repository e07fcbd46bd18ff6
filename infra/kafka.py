"""A real single-node Apache Kafka broker (KRaft combined mode) from Maven Central jars."""

from __future__ import annotations

import base64
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from infra import processes
from infra.errors import CorruptState, InfraError
from infra.processes import find_binary

KAFKA_VERSION = "4.1.1"
POM = Path(__file__).with_name("maven") / "pom.xml"
READY_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class LocalKafka:
    """The broker's files live under ``state_dir/kafka``; the jars under ``state_dir/lib``."""

    state_dir: Path
    port: int
    controller_port: int
    heap: str = "1g"
    jar_cache: Path | None = None  # defaults to state_dir/lib; tests share one cache

    @property
    def home(self) -> Path:
        return self.state_dir / "kafka"

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

    def _write_config(self) -> Path:
        data = self.home / "data"
        props = self.home / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={data}",
                    "num.partitions=6",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=12",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
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
        if fields.get("node.id") != "1" or not fields.get("cluster.id"):
            raise CorruptState(
                f"Kafka state in {data} is corrupted ({meta} is missing or unreadable); "
                "wipe it with `make clean` (or `flashsale infra down --wipe`) and run `make up`"
            )
        return True

    def _format(self, props: Path) -> None:
        cluster_id = "-"
        while cluster_id.startswith("-"):  # 1 in 64 would read as an option to StorageTool
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
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
        """True when the broker answers a metadata request and lists itself."""
        from confluent_kafka.admin import AdminClient

        if processes.port_is_free(self.port):
            return False
        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000, "log_level": 0}
        )
        try:
            return bool(admin.list_topics(timeout=timeout).brokers)
        except Exception:  # KafkaException on timeout: not up yet
            return False

    def start(self) -> bool:
        """Start the broker unless it already runs; wait until it answers. True if started."""
        if self.pid() is not None:
            if processes.wait_until(self.answers, READY_TIMEOUT_S, 0.5):
                return False
            raise InfraError(
                f"Kafka (pid {self.pid()}) runs but does not answer; see {self.logfile}"
            )
        self.pidfile.unlink(missing_ok=True)
        processes.require_free_port(self.port, "Kafka", "FLASHSALE_KAFKA_PORT")
        processes.require_free_port(
            self.controller_port, "the Kafka controller", "FLASHSALE_KAFKA_CONTROLLER_PORT"
        )
        self.ensure_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        if not self._check_meta():
            self._format(props)
        argv = [
            self._java(), f"-Xmx{self.heap}", "-Xms256m", "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            *self._log_opts(), "-cp", self._classpath(), "kafka.Kafka", str(props),
        ]  # fmt: skip
        self.logfile.write_text("")
        pid = processes.spawn(argv, self.logfile, self.pidfile, env=dict(os.environ))
        started = time.monotonic()
        while time.monotonic() - started < READY_TIMEOUT_S:
            if not processes.alive(pid):
                self.pidfile.unlink(missing_ok=True)
                tail = processes.log_tail(self.logfile)
                if "meta.properties" in tail or "cluster" in tail.lower():
                    raise CorruptState(
                        f"Kafka refused its state in {self.home / 'data'}; wipe it with "
                        f"`make clean` and run `make up`. Broker log:\n{tail}"
                    )
                raise InfraError(f"Kafka exited during start-up. Broker log:\n{tail}")
            if self.answers(timeout=1.0):
                return True
            time.sleep(0.3)
        raise InfraError(f"Kafka did not answer within {READY_TIMEOUT_S:.0f}s; see {self.logfile}")

    def stop(self) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL). True if one was running."""
        return processes.stop_tracked(self.pid(), self.pidfile, grace=45.0)
