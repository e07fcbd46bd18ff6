"""The topic catalogue: every topic flashsale owns, with its key, schemas and configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from flashsale.settings import Settings

SKU_COMMANDS = "flashsale.sku-commands"
DECISIONS = "flashsale.decisions"
DEAD_LETTERS = "flashsale.dead-letters"

RETAIN_FOREVER = -1
THIRTY_DAYS_MS = 30 * 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicNames:
    """Topic names under a namespace (``FLASHSALE_NAMESPACE``; benchmarks use their own)."""

    sku_commands: str
    decisions: str
    dead_letters: str
    ledger_changelog: str = "flashsale-inventory-ledger-changelog"

    @classmethod
    def of(cls, settings: Settings) -> TopicNames:
        """The names for settings' namespace (``flashsale`` gives the catalogue's defaults)."""
        ns = settings.namespace
        return cls(
            f"{ns}.sku-commands",
            f"{ns}.decisions",
            f"{ns}.dead-letters",
            # Faust names a table's changelog <app id>-<table>-changelog.
            f"{ns}-inventory-ledger-changelog",
        )


@dataclass(frozen=True)
class TopicSpec:
    """One topic: name, key, the Avro records its values may hold, and broker configuration."""

    name: str
    key: str
    value_schemas: tuple[str, ...]
    partitions: int
    replication_factor: int
    cleanup_policy: str
    retention_ms: int
    timestamp_type: str
    min_insync_replicas: int
    description: str
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        """Topic-level broker configuration to create it with and to check for drift."""
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "message.timestamp.type": self.timestamp_type,
            "min.insync.replicas": str(self.min_insync_replicas),
            "unclean.leader.election.enable": "false",
            **self.extra_config,
        }


def catalogue(settings: Settings) -> tuple[TopicSpec, ...]:
    """Every topic, sized from settings (partitions, replication factor)."""
    rf = settings.replication_factor
    isr = 1 if rf == 1 else 2
    # Input and decision topics share the partition count so one SKU maps to the same
    # partition number in both (and in the processor's table changelogs).
    n = settings.partitions
    names = TopicNames.of(settings)
    return (
        TopicSpec(
            name=names.sku_commands,
            key="sku (UTF-8); none for ClockTick",
            value_schemas=(
                "OpenSale",
                "CloseSale",
                "SettleSale",
                "ReturnUnits",
                "PurchaseIntent",
                "RevealDraw",
                "ClockTick",
            ),
            partitions=n,
            replication_factor=rf,
            cleanup_policy="delete",
            retention_ms=RETAIN_FOREVER,
            timestamp_type="LogAppendTime",
            min_insync_replicas=isr,
            description="Every input that changes a SKU's state, in one order per SKU. "
            "The broker stamps arrival time; sale windows are judged on it.",
        ),
        TopicSpec(
            name=names.decisions,
            key="sku (UTF-8)",
            value_schemas=(
                "SaleOpened",
                "IntentAccepted",
                "IntentRejected",
                "SaleClosed",
                "UnitsReturned",
                "SaleSettled",
                "SaleRefused",
                "EntryQueued",
                "DrawRevealed",
                "QueueExpired",
                "QueueProgress",
            ),
            partitions=n,
            replication_factor=rf,
            cleanup_policy="delete",
            retention_ms=RETAIN_FOREVER,
            timestamp_type="CreateTime",
            min_insync_replicas=isr,
            description="Every fact of a (sale, SKU), numbered gap-free by sequence: the sale "
            "opened (its terms and rules version), exactly one decision per intent id (a "
            "repeated intent gets none), units returned, closed, settled, refused commands; "
            "for a pre-queue sale, intents queued, the draw revealed or the queue expired; "
            "and, not numbered, QueueProgress: how far through its input the writer is, after "
            "every progress_every-th event of a sale and after the one that took its last unit.",
        ),
        TopicSpec(
            name=names.dead_letters,
            key="the source record's key",
            value_schemas=(),
            partitions=n,
            replication_factor=rf,
            cleanup_policy="delete",
            retention_ms=THIRTY_DAYS_MS,
            timestamp_type="CreateTime",
            min_insync_replicas=isr,
            description="Records that could not be decoded or broke their schema, as received; "
            "headers: dlq.source.topic, dlq.source.partition, dlq.source.offset, dlq.reason.",
        ),
        TopicSpec(
            name=names.ledger_changelog,
            key="state key (processors/state_layout.py)",
            value_schemas=(),
            partitions=n,
            replication_factor=rf,
            cleanup_policy="compact",
            retention_ms=RETAIN_FOREVER,
            timestamp_type="CreateTime",
            min_insync_replicas=isr,
            description="The inventory writer's RocksDB table (batch deltas and checkpoints), "
            "written in the same transaction as the decisions; Faust restores the table from it.",
        ),
    )
