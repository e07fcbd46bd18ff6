"""Create the catalogue's topics idempotently and report drift from the catalogue."""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import ConfigResource, NewTopic

from flashsale.kafka_auth import AdminClient
from flashsale.topics import TopicSpec
from infra.errors import InfraError


def ensure_topics(
    bootstrap: str, specs: Iterable[TopicSpec], timeout: float = 30.0
) -> tuple[list[str], list[str]]:
    """Create missing topics; return (created names, drift messages for existing ones)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise InfraError(f"Kafka at {bootstrap} did not answer: {exc}") from None
    specs = list(specs)
    missing = [s for s in specs if s.name not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(s.name, s.partitions, s.replication_factor, config=s.config())
                for s in missing
            ],
            operation_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: a concurrent creator won
                    raise InfraError(f"creating topic {name} failed: {exc}") from None
    present = [s for s in specs if s.name in existing]
    return created, drift(admin, present, {n: len(existing[n].partitions) for n in existing})


def wait_until_led(bootstrap: str, specs: Iterable[TopicSpec], timeout: float = 60.0) -> None:
    """Return once the broker's metadata shows every partition of ``specs`` with a leader.

    A topic just created, or a broker just restarted with many partitions to load, may be
    missing from its metadata for a moment; a Faust group formed then assigns that topic to
    no one (``Ignoring missing topic``) until its next metadata refresh, minutes later."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    want = {s.name: s.partitions for s in specs}
    deadline = time.monotonic() + timeout
    missing: list[str] = list(want)
    while time.monotonic() < deadline:
        try:
            topics = admin.list_topics(timeout=5).topics
        except KafkaException:
            topics = {}
        missing = [
            name for name, n in want.items()
            if name not in topics or topics[name].error is not None
            or len(topics[name].partitions) != n
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]  # fmt: skip
        if not missing:
            return
        time.sleep(0.2)
    raise InfraError(f"Kafka at {bootstrap} shows no leader for {', '.join(missing)} "
                     f"after {timeout:.0f} s")  # fmt: skip


def drift(admin: AdminClient, specs: list[TopicSpec], partitions: dict[str, int]) -> list[str]:
    """Differences between existing topics and the catalogue, one message each."""
    problems: list[str] = []
    if not specs:
        return problems
    resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in specs]
    configs = {r.name: f.result() for r, f in admin.describe_configs(resources).items()}
    for spec in specs:
        if partitions[spec.name] != spec.partitions:
            problems.append(
                f"{spec.name}: has {partitions[spec.name]} partitions, catalogue says "
                f"{spec.partitions} (a SKU could map to another partition: recreate the topic "
                "or set FLASHSALE_PARTITIONS to match)"
            )
        actual = configs[spec.name]
        for key, want in spec.config().items():
            have = actual[key].value if key in actual else None
            if have != want:
                problems.append(f"{spec.name}: {key}={have}, catalogue says {want}")
    return problems
