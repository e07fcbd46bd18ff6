"""Composition root of the inventory processor: a Faust app around ``SkuWriter``.

One agent (concurrency=1) per worker consumes the SKU-keyed command topic; each partition
has exactly one writer. State lives in two RocksDB tables (rocksdict) whose changelogs have
the command topic's partition count; decisions go to the decision topic on the same
partition number as their command (both topics are keyed by SKU with murmur2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faust
import structlog
from faust.types import ProcessingGuarantee

from flashsale.settings import SettingError, Settings, env_int
from flashsale.topics import TopicNames
from processors.writer import SkuWriter
from schemas.codec import SchemaRegistry

log = structlog.get_logger("processors.app")

# Small RocksDB footprint: one DB per partition, the defaults would be GiBs.
ROCKSDB_OPTIONS = {
    "write_buffer_size": 8 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "block_cache_size": 16 * 1024 * 1024,
    "block_cache_compressed_size": 0,
    "max_open_files": 256,
}


def _guarantee(env: dict[str, str]) -> ProcessingGuarantee:
    raw = env.get("FLASHSALE_PROCESSING_GUARANTEE", "exactly_once")
    try:
        return ProcessingGuarantee(raw)
    except ValueError:
        raise SettingError(
            f"FLASHSALE_PROCESSING_GUARANTEE={raw!r} must be at_least_once or exactly_once"
        ) from None


def _flush_changelog_before_commit() -> None:
    """Make Faust's exactly-once commit include every table write made before it.

    Table writes reach their changelog through Faust's ProducerBuffer, in the background.
    At-least-once commits flush that buffer before committing offsets; the transactional
    commit does not, so a changelog record of an event whose offset is being committed can
    land in the *next* transaction, and be lost with it if the worker dies (the lost table
    updates of faust-streaming #340/#502), or be sent between commit and the next
    begin_transaction ("Can't send messages while not in transaction"). Flushing first puts
    each event's changelog record in the same transaction as its offset. Records of later
    events may join that transaction too: harmless, because a redelivered command re-decides
    to byte-identical output.
    """
    from faust.transport.consumer import TransactionManager

    if getattr(TransactionManager.commit, "_flashsale_flushes", False):
        return
    original = TransactionManager.commit

    async def commit(self: Any, offsets: Any, start_new_transaction: bool = True) -> bool:
        # Only what is queued now belongs to the offsets being committed; records queued
        # while we flush wait for the transaction lock and join the next transaction.
        buffer = self.app.producer.buffer
        await buffer.flush_atmost(buffer.size)
        return bool(await original(self, offsets, start_new_transaction))

    commit._flashsale_flushes = True  # type: ignore[attr-defined]
    TransactionManager.commit = commit  # type: ignore[method-assign]


def build_app(settings: Settings, endpoints_bootstrap: str) -> faust.App:
    """Build the Faust app, its topics, tables and agent from settings."""
    env = dict(os.environ)
    commit_ms = env_int(env, "FLASHSALE_COMMIT_INTERVAL_MS", 100, 1, 60_000)
    names = TopicNames.of(settings)
    app_id = f"{settings.namespace}-inventory"
    datadir = Path(
        env.get("FLASHSALE_PROCESSOR_DATADIR") or settings.state_dir / "processor" / app_id
    )
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
        app_id,
        broker=f"aiokafka://{endpoints_bootstrap}",
        store="rocksdb://",
        datadir=str(datadir),
        processing_guarantee=_guarantee(env),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_commit_interval=commit_ms / 1000,
        broker_commit_every=10_000,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        web_enabled=False,
        topic_allow_declare=True,
        table_standby_replicas=0,
        producer_acks=-1,
        producer_linger_ms=2,
        stream_buffer_maxsize=8192,
        consumer_auto_offset_reset="earliest",
    )
    if app.conf.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE:
        _flush_changelog_before_commit()
    log.info(
        "processor.configured",
        app_id=app_id,
        guarantee=app.conf.processing_guarantee.value,
        commit_interval_ms=commit_ms,
        partitions=settings.partitions,
    )
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes}
    raw |= {"key_serializer": "raw", "value_serializer": "raw"}
    n = settings.partitions
    commands = app.topic(names.sku_commands, partitions=n, **raw)
    decisions_topic = app.topic(names.decisions, partitions=n, **raw)
    dead_letters = app.topic(names.dead_letters, partitions=n, **raw)
    decisions = app.Table(
        SkuWriter.DECISIONS, partitions=n, key_type=str, value_type=bytes, options=ROCKSDB_OPTIONS
    )
    sales = app.Table(
        SkuWriter.SALES, partitions=n, key_type=str, value_type=bytes, options=ROCKSDB_OPTIONS
    )
    tables = {SkuWriter.DECISIONS: decisions, SkuWriter.SALES: sales}
    writer = SkuWriter(SchemaRegistry.load_default())

    # Under exactly-once Faust looks up the transactional producer by the *destination*
    # topic's group, which only exists for consumed topics. Our outputs share the command
    # topic's partitioning, so they belong to its group (and thus its transaction).
    lookup = app.assignor.group_for_topic

    def group_for_topic(topic: str) -> int:
        try:
            return lookup(topic)
        except KeyError:
            return lookup(names.sku_commands)

    app.assignor.group_for_topic = group_for_topic  # type: ignore[method-assign]

    # A rebalance may move partitions: rebuild the ledgers from the tables before the next event.
    async def _mark_stale(sender: Any, *args: Any, **kwargs: Any) -> None:
        writer.stale = True

    app.on_partitions_revoked.connect(_mark_stale)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(_mark_stale)  # type: ignore[arg-type]

    @app.agent(commands, concurrency=1)
    async def decide_commands(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            if writer.stale:
                writer.rebuild(decisions.values(), sales.items())
            msg = event.message
            out = writer.handle(msg.value, round(msg.timestamp * 1000))
            for table, key, value in out.table_writes:
                if value is None:
                    # Unconditional: Faust sends the changelog tombstone before it touches
                    # the store, and a RocksDB delete of an absent key is a no-op.
                    del tables[table][key]
                else:
                    tables[table][key] = value
            for sku, value in out.decisions:
                await decisions_topic.send(key=sku.encode(), value=value, partition=msg.partition)
            if out.dead_letter is not None:
                dl = out.dead_letter
                log.warning("record.dead_lettered", partition=msg.partition, offset=msg.offset,
                            reason=dl.reason)  # fmt: skip
                await dead_letters.send(
                    key=msg.key,
                    value=msg.value,
                    partition=msg.partition,
                    headers={
                        "dlq.source.topic": msg.topic.encode(),
                        "dlq.source.partition": str(msg.partition).encode(),
                        "dlq.source.offset": str(msg.offset).encode(),
                        "dlq.reason": dl.reason.encode(),
                        "dlq.detail": dl.detail.encode()[:1000],
                    },
                )

    return app


def main(settings: Settings, bootstrap: str, loglevel: str = "warn") -> None:
    """Run one inventory worker until SIGTERM/SIGINT."""
    app = build_app(settings, bootstrap)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
