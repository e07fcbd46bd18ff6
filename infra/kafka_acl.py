"""Who may do what on a secured cluster: one principal per service, its SCRAM credential and
its ACLs, made (idempotently) by the provisioning principal for one namespace.

Writers of the command topic: the edge (intents), the sale clock (ticks, reveals), the payment
service (payment results) and the operator (``admin``: opening and running sales). Only the
writer writes the decision topic, the dead letters and its table's changelog, under its own
transactional ids. Readers read what they need; groups are namespaced. A topic ACL cannot
restrict record types, so intents also carry the edge's signature (``flashsale.intent_sig``).
Nothing is allowed without an ACL (``allow.everyone.if.no.acl.found=false``).
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)

from flashsale import kafka_auth
from flashsale.kafka_auth import AdminClient
from flashsale.settings import Settings
from flashsale.topics import TopicNames
from infra.errors import InfraError

Grant = tuple[ResourceType, str, ResourcePatternType, AclOperation]
READ, WRITE, DESCRIBE = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
CONFIGS = AclOperation.DESCRIBE_CONFIGS
LITERAL, PREFIXED = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED


def _topic(name: str, *ops: AclOperation) -> list[Grant]:
    return [(ResourceType.TOPIC, name, LITERAL, op) for op in ops]


def _group(name: str) -> list[Grant]:
    return [(ResourceType.GROUP, name, LITERAL, READ)]


def _groups(prefix: str) -> list[Grant]:
    """Groups named ``prefix``…; every prefix holds a ``.``, which no namespace may: it
    cannot match another namespace's (another principal's) groups."""
    assert "." in prefix, prefix
    return [(ResourceType.GROUP, prefix, PREFIXED, READ)]


def grants(settings: Settings) -> dict[str, list[Grant]]:
    """Each service principal's ACLs in settings' namespace."""
    ns, n = settings.namespace, TopicNames.of(settings)
    cmd, dec, dlq, log = n.sku_commands, n.decisions, n.dead_letters, n.ledger_changelog
    app_id = f"{ns}-inventory"
    read_all = [g for t in (cmd, dec, dlq) for g in _topic(t, READ, DESCRIBE)]
    return {
        # its feed and end-offset readers assign partitions under groups of their own
        "edge": _topic(cmd, WRITE, DESCRIBE) + _topic(dec, READ, DESCRIBE)
        + _groups(f"{dec}.edge-"),
        "clock": _topic(cmd, WRITE, DESCRIBE),
        "payments": _topic(cmd, WRITE, DESCRIBE) + _topic(dec, READ, DESCRIBE)
        + _group(f"{ns}-payments"),
        "writer": _topic(cmd, READ, DESCRIBE, CONFIGS) + _topic(dec, WRITE, DESCRIBE, CONFIGS)
        + _topic(dlq, WRITE, DESCRIBE, CONFIGS) + _topic(log, READ, WRITE, DESCRIBE, CONFIGS)
        + _group(app_id) + _group(f"{app_id}-probe") + _group(f"{cmd}-replay")
        # Faust looks its leader topic up (never made): "not found", not "not authorized"
        + _topic(f"{app_id}-__assignor-__leader", DESCRIBE)
        + [(ResourceType.TRANSACTIONAL_ID, app_id, PREFIXED, op) for op in (WRITE, DESCRIBE)],
        "projector": _topic(cmd, READ, DESCRIBE) + _topic(dec, READ, DESCRIBE)
        + _group(f"{ns}-projector"),
        "analytics": _topic(cmd, READ, DESCRIBE) + _topic(dec, READ, DESCRIBE)
        + _group(f"{ns}-analytics"),
        # downstream teams read decisions in groups <namespace>.downstream.<team> (and the
        # example fulfilment consumer in its own)
        "downstream": _topic(dec, READ, DESCRIBE) + _groups(f"{ns}.downstream.")
        + _group(f"{ns}-fulfilment"),
        # auditors replay every topic of the namespace, committing nothing
        "auditor": read_all,
    }  # fmt: skip


def ensure_principals(bootstrap: str, settings: Settings, timeout: float = 30.0) -> list[str]:
    """Give every service principal its SCRAM credential (its password file's) and its ACLs
    in settings' namespace; as the provisioning principal. Returns the principals."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    table = grants(settings)
    secrets = kafka_auth.secrets_dir(settings)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(user, info, kafka_auth.password(secrets, user).encode())
        for user in table
    ]
    _wait(admin.alter_user_scram_credentials(upserts, request_timeout=timeout).values(), "SCRAM")
    bindings = [
        AclBinding(rtype, name, pattern, f"User:{user}", "*", op, AclPermissionType.ALLOW)
        for user, granted in table.items()
        for rtype, name, pattern, op in granted
    ]
    _wait(admin.create_acls(bindings, request_timeout=timeout).values(), "ACL")
    return list(table)


def _wait(futures: Iterable, what: str) -> None:
    for fut in futures:
        try:
            fut.result()
        except KafkaException as exc:
            raise InfraError(f"provisioning {what} on Kafka failed: {exc}") from None
