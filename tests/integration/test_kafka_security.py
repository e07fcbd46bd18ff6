"""A secured broker (SASL, ACLs, no anonymous access): each service principal may do what
its role needs and is refused the rest; a wrong password or no login is refused; intents
need the edge's signature; no secret shows in ``ps`` or in a log."""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition
from confluent_kafka.admin import (
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from flashsale import intent_sig, kafka_auth
from flashsale.settings import Settings
from flashsale.topics import TopicNames, catalogue
from infra import kafka_acl, provision
from infra.kafka import LocalKafka
from infra.stack import Endpoints
from producers.commands import SkuAllocation
from schemas.codec import SchemaRegistry
from tests.conftest import free_port, local_only, operator_of
from tests.integration.pipeline import Pipeline, start_pipeline


@pytest.fixture(scope="module")
def secured(settings: Settings) -> Iterator[tuple[LocalKafka, Settings]]:
    """A node of the module's own with SASL and ACLs; this test process is the operator."""
    local_only(settings)
    home = settings.state_dir / "test" / f"secure-{uuid.uuid4().hex[:10]}"
    s = dataclasses.replace(settings, kafka_auth="scram", secrets_override=home / "secrets",
                            namespace=f"t-sec{uuid.uuid4().hex[:8]}")  # fmt: skip
    node = LocalKafka(home, free_port(), free_port(), "512m", settings.state_dir / "lib",
                      secrets=kafka_auth.secrets_dir(s))  # fmt: skip
    try:
        node.start()
        with operator_of(s):  # admin, holding the intent key
            provision.ensure_topics(node.bootstrap, catalogue(s))
            kafka_acl.ensure_principals(node.bootstrap, s)
            yield node, s
    finally:
        node.stop()
        shutil.rmtree(home, ignore_errors=True)


def _as(s: Settings, user: str, password: str | None = None) -> dict[str, Any]:
    password = password or kafka_auth.password(kafka_auth.secrets_dir(s), user)
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": kafka_auth.SCRAM,
            "sasl.username": user, "sasl.password": password}  # fmt: skip


def _produce(bootstrap: str, conf: dict[str, Any], topic: str, value: bytes = b"x",
             headers: Any = None) -> KafkaError | None:  # fmt: skip
    """Produce one record as the principal in ``conf``; its delivery error (None: written)."""
    p = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000,
                                  "log_level": 0, **conf})  # fmt: skip
    got: list[KafkaError | None] = []
    p.produce(topic, value, key=b"k", headers=headers, on_delivery=lambda e, _: got.append(e))
    p.flush(15)
    assert got, "no delivery report"
    return got[0]


def _read_error(bootstrap: str, conf: dict[str, Any], topic: str, group: str) -> int | None:
    """The error code a subscribed consumer of ``topic`` in ``group`` gets (None: none)."""
    c = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                  "auto.offset.reset": "earliest", "log_level": 0,
                                  **conf})  # fmt: skip
    c.subscribe([topic])
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and msg.error() is not None:
                return int(msg.error().code())
            if msg is not None:
                return None  # a record read: allowed
        raise AssertionError(f"nothing read from {topic} in 15 s, neither a record nor an error")
    finally:
        c.close()


def test_each_principal_may_do_its_part_and_is_refused_the_rest(secured):
    node, s = secured
    n = TopicNames.of(s)
    b = node.bootstrap
    denied = KafkaError.TOPIC_AUTHORIZATION_FAILED
    for user, topic, allowed in [
        ("edge", n.sku_commands, True),
        ("payments", n.sku_commands, True),
        ("clock", n.sku_commands, True),
        ("edge", n.decisions, False),  # only the writer writes decisions
        ("payments", n.decisions, False),
        ("projector", n.sku_commands, False),  # readers write nothing
        ("downstream", n.sku_commands, False),
        ("auditor", n.decisions, False),
        ("writer", n.sku_commands, False),  # the writer reads commands, never writes them
    ]:
        err = _produce(b, _as(s, user), topic)
        if allowed:
            assert err is None, (user, topic, err)
        else:
            assert err is not None and err.code() == denied, (user, topic, err)
    # a downstream team reads decisions in its own group, but neither the commands nor the
    # writer's group (joining it would take the writer's partitions)
    groups = KafkaError.GROUP_AUTHORIZATION_FAILED
    operator = kafka_auth.admin_conf(kafka_auth.secrets_dir(s))
    assert _produce(b, operator, n.decisions) is None  # something for the readers to read
    down = _as(s, "downstream")
    assert _read_error(b, down, n.decisions, f"{s.namespace}.downstream.shipping") is None
    assert _read_error(b, down, n.sku_commands, f"{s.namespace}.downstream.x") == denied
    # a group prefix never reaches past the namespace: another namespace's writer group
    other = f"{s.namespace}-downstream-x-inventory"  # a namespace "<ns>-downstream-x"
    assert _read_error(b, down, n.decisions, other) == groups
    assert _read_error(b, down, n.decisions, f"{s.namespace}-inventory") == groups


def test_a_principal_without_acls_gets_nothing(secured):
    node, s = secured
    n = TopicNames.of(s)
    admin = kafka_auth.AdminClient({"bootstrap.servers": node.bootstrap})
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upsert = UserScramCredentialUpsertion("nobody", info, b"nobody-password-" + b"x" * 16)
    admin.alter_user_scram_credentials([upsert])["nobody"].result(30)
    nobody = _as(s, "nobody", "nobody-password-" + "x" * 16)
    for topic in (n.sku_commands, n.decisions):  # default deny: no ACL, no write
        err = _produce(node.bootstrap, nobody, topic)
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    denied = _read_error(node.bootstrap, nobody, n.decisions, f"{s.namespace}.downstream.n")
    assert denied in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED)


def test_a_wrong_password_or_no_login_is_refused(secured):
    node, s = secured
    n = TopicNames.of(s)
    err = _produce(node.bootstrap, _as(s, "edge", "not-the-password"), n.sku_commands)
    assert err is not None and err.code() in (KafkaError._AUTHENTICATION, KafkaError._MSG_TIMED_OUT)
    anonymous = confluent_kafka.admin.AdminClient({"bootstrap.servers": node.bootstrap,
                                                   "log_level": 0})  # fmt: skip
    with pytest.raises(confluent_kafka.KafkaException):
        anonymous.list_topics(timeout=5)


def _records(bootstrap: str, topic: str) -> list[Any]:
    c = kafka_auth.Consumer({"bootstrap.servers": bootstrap, "group.id": "unused",
                             "enable.auto.commit": False, "isolation.level": "read_committed",
                             "log_level": 0})  # fmt: skip
    count = len(c.list_topics(topic, timeout=10).topics[topic].partitions)
    ends = [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(count)]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(len(ends))])
    got: list[Any] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the ends count transaction markers too: read to them
        batch = c.consume(500, timeout=0.5)
        got += [m for m in batch if m.error() is None]
        done = [e == 0 or c.position([TopicPartition(topic, p)])[0].offset >= e
                for p, e in enumerate(ends)]  # fmt: skip
        if not batch and all(done):
            break
    c.close()
    return got


def test_the_writer_decides_signed_intents_and_dead_letters_unsigned_and_forged_ones(
    secured, settings: Settings
):
    node, s = secured
    pipeline: Pipeline = start_pipeline(s, Endpoints(node.bootstrap, settings.database_url),
                                        s.namespace.removeprefix("t-"))  # fmt: skip
    try:
        n = pipeline.names
        sale = f"sec-{uuid.uuid4().hex[:8]}"
        pipeline.open_sale(sale, [SkuAllocation("s1", 5, 5, 1)])  # as the operator
        producer = pipeline.producer()  # signs: the operator holds the intent key
        signed = producer.post_intent(sale, "s1", "u-signed", 1, "k1")
        registry = SchemaRegistry.load_default()
        unsigned = producer.encode_intent(sale, "s1", "u-unsigned", 1, "k2")
        forged = producer.encode_intent(sale, "s1", "u-forged", 1, "k3")
        clock = _as(s, "clock")  # may write the command topic, holds no intent key
        assert _produce(node.bootstrap, clock, n.sku_commands, unsigned) is None
        bad_sig = [(intent_sig.HEADER, intent_sig.sign(unsigned, b"k" * 32))]
        assert _produce(node.bootstrap, clock, n.sku_commands, forged, bad_sig) is None
        deadline = time.monotonic() + 60
        reasons: list[bytes] = []
        while time.monotonic() < deadline and len(reasons) < 2:
            letters = _records(node.bootstrap, n.dead_letters)  # also the other test's b"x"s
            reasons = sorted(r for m in letters if (r := dict(m.headers())["dlq.reason"])
                             in (b"forged-intent", b"unsigned-intent"))  # fmt: skip
            time.sleep(0.5)
        assert reasons == [b"forged-intent", b"unsigned-intent"]
        decided = {
            registry.decode(m.value())[1].get("intent_id")
            for m in _records(node.bootstrap, n.decisions)
            if m.value() != b"x"
        }  # fmt: skip  (the first test's record)
        assert signed in decided
        ids = {registry.decode(v)[1]["intent_id"] for v in (unsigned, forged)}
        assert not ids & decided, "an unsigned or forged intent was decided"
    finally:
        pipeline.stop()
    # no secret of any principal in any process's command line, nor in the logs
    secrets = [p.read_text().strip() for p in Path(s.secrets_dir).rglob("*") if p.is_file()]
    assert len(secrets) >= len(kafka_acl.grants(s)) + 2
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(x in text for x in secrets), f"a secret in {cmdline}"
    logs = [*(pipeline.settings.state_dir / "run" / s.namespace).glob("*.log"), node.logfile]
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(x in text for x in secrets), f"a secret in {log}"
