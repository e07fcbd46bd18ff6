"""Composition root of the inventory processor: a Faust agent around ``PartitionWriter``.

One agent (concurrency=1) consumes the SKU-keyed command topic through the batch transport
(processors/faust_runtime.py): each event is one fetched batch of one partition, so each
partition has exactly one writer and one ordered stream. A batch is decided in chunks, its
decisions go out as producer batches on the partition's transactional producer, its state
changes as one delta in the ``ledger`` table (processors/state_layout.py), and only then is
its offset marked processed. Faust's exactly-once commit puts all of that in one transaction.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import faust
import structlog
from confluent_kafka import KafkaException, TopicPartition
from faust.types import TP, ProcessingGuarantee

from flashsale import intent_sig, kafka_auth
from flashsale.kafka_auth import Consumer
from flashsale.service_metrics import ServiceMetrics
from flashsale.settings import SettingError, Settings, env_int
from flashsale.topics import TopicNames, catalogue
from processors import faust_runtime as runtime_mod
from processors.batch_runtime import BatchRuntime, SeekBacks
from processors.broker_reads import patient, replay
from processors.writer import BatchResult, PartitionWriter, StateMissing
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
CHUNK = 500  # records decided between two yields to the event loop
BATCH_SEND_MIN = 200  # fewer decisions than this join the partition's pending producer batch
HOLD_MAX = 4000  # records held per partition before they are sent without waiting for a commit
LEDGER_TABLE = "ledger"
GIL_SWITCH_INTERVAL_S = 0.0005


def _guarantee(env: dict[str, str]) -> ProcessingGuarantee:
    raw = env.get("FLASHSALE_PROCESSING_GUARANTEE", "exactly_once")
    if raw != "exactly_once":
        raise SettingError(
            f"FLASHSALE_PROCESSING_GUARANTEE={raw!r}: the writer runs exactly_once only "
            "(its state and offsets must commit together)"
        )
    return ProcessingGuarantee.EXACTLY_ONCE


def default_datadir(settings: Settings) -> Path:
    """Where a worker keeps its tables' RocksDB unless ``FLASHSALE_PROCESSOR_DATADIR`` says."""
    return settings.state_dir / "processor" / f"{settings.namespace}-inventory"


def _sasl() -> faust.SASLCredentials | None:
    """The writer's SCRAM login (``flashsale.kafka_auth``), None when it has none."""
    creds = kafka_auth.credentials()
    if creds is None:
        return None
    return faust.SASLCredentials(username=creds[0], password=creds[1],
                                 mechanism=kafka_auth.SCRAM)  # fmt: skip


def build_app(settings: Settings, bootstrap: str) -> faust.App:
    """Build the Faust app, its topics, table and agent from settings."""
    if kafka_auth.credentials() is not None and intent_sig.key() is None:
        # on a secured cluster an unchecked intent could come from any command-topic writer
        raise SettingError(
            f"the writer logs in to a secured cluster ({kafka_auth.ENV_USER}) but has no "
            f"intent key: set {intent_sig.ENV_KEY_FILE} (make up and the supervisor do)"
        )
    env = dict(os.environ)
    commit_ms = env_int(env, "FLASHSALE_COMMIT_INTERVAL_MS", 100, 1, 60_000)
    max_poll = env_int(env, "FLASHSALE_PROCESSOR_MAX_BATCH", 2000, 1, 100_000)
    worker_id = env_int(env, "FLASHSALE_WORKER_ID", 0, 0, 1000)
    names = TopicNames.of(settings)
    app_id = f"{settings.namespace}-inventory"
    datadir = Path(env.get("FLASHSALE_PROCESSOR_DATADIR") or default_datadir(settings))
    datadir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
        app_id,
        broker=";".join(f"{runtime_mod.SCHEME}://{b}" for b in bootstrap.split(",")),
        store="rocksdb://",
        datadir=str(datadir),
        processing_guarantee=_guarantee(env),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_commit_interval=runtime_mod.FAUST_COMMIT_BACKSTOP_S,  # runtime.committer commits
        broker_commit_every=10**9,  # commits follow the interval; ours are per whole batch
        broker_session_timeout=10.0,
        # Static membership: a restarted worker (after a crash too) takes its partitions back
        # at once instead of waiting for the session timeout of its previous incarnation.
        consumer_group_instance_id=f"{app_id}-{worker_id}",
        broker_heartbeat_interval=1.0,
        broker_max_poll_records=max_poll,
        web_enabled=False,
        topic_allow_declare=False,  # provisioning created and verified every topic
        broker_credentials=_sasl(),
        # A warm copy of other workers' partitions (Faust's standby recovery over the
        # changelog); off by default: our restore is as fast as a local start (README).
        table_standby_replicas=env_int(env, "FLASHSALE_STANDBY_REPLICAS", 0, 0, 2),
        producer_acks=-1,
        producer_linger_ms=0,
        producer_max_batch_size=1024 * 1024,
        producer_max_request_size=4 * 1024 * 1024,
        # Events are whole fetched batches: a deep buffer only holds stale work (at 5,000
        # intents/s: p99 3.1 s with 256, 0.6-1.5 s with 64, 0.5-0.7 s with 16).
        stream_buffer_maxsize=16,
        consumer_auto_offset_reset="earliest",
    )
    run_dir = settings.state_dir / "run" / settings.namespace
    txn_timeout = env_int(env, "FLASHSALE_TRANSACTION_TIMEOUT_MS", 60_000, 1_000, 900_000)
    runtime = BatchRuntime(names.sku_commands, _crash_recorder(run_dir), txn_timeout)
    runtime_mod.install(app, runtime)
    log.info("processor.configured", app_id=app_id, commit_interval_ms=commit_ms,
             partitions=settings.partitions, max_batch=max_poll)  # fmt: skip
    changelog = names.ledger_changelog
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes}
    raw |= {"key_serializer": "raw", "value_serializer": "raw"}
    n = settings.partitions
    commands = app.topic(names.sku_commands, partitions=n, **raw)
    ledger = app.Table(LEDGER_TABLE, partitions=n, key_type=bytes, value_type=bytes,
                       options=ROCKSDB_OPTIONS)  # fmt: skip
    registry = SchemaRegistry.load_default()
    writers: dict[int, PartitionWriter] = {}
    seek_backs = SeekBacks()

    async def _forget(sender: Any, revoked: set[TP], **kwargs: Any) -> None:
        for tp in revoked:  # reloaded from the (recovered) table if assigned again
            if tp.topic == names.sku_commands:
                writers.pop(tp.partition, None)
                seek_backs.forget(tp)
                held = pending.pop(tp.partition, None)
                done = runtime.processed.pop(tp, None)
                if held or (done is not None and done > runtime.committed.get(tp, -1)):
                    # Faust's last commit before a revocation should have covered it.
                    runtime.crash("partition revoked with uncommitted output", tp.partition, done)

    app.on_partitions_revoked.connect(_forget)  # type: ignore[arg-type]

    # The group's committed input offsets, asked of the broker itself (no group membership):
    # the writer's state is cut back to where consumption resumes, so consumption must not
    # resume past what the group committed.
    committed_probe = Consumer({"bootstrap.servers": bootstrap, "group.id": app_id,
                                "enable.auto.commit": False, "log_level": 3})  # fmt: skip

    def group_committed(partition: int) -> int:
        """The partition's committed offset; its log start when nothing is committed yet
        (where consumption starts, ``auto_offset_reset`` being earliest). This holds while no
        producer writes the command topic in transactions (none does): a control marker or an
        aborted record at the log start would put the first record past it."""
        tp = TopicPartition(names.sku_commands, partition)
        refresh = functools.partial(committed_probe.list_topics, names.sku_commands, timeout=5)
        [got] = patient("committed", committed_probe.committed, [tp], timeout=5, refresh=refresh)
        if got.error is not None:  # not "nothing committed": never fall back to the start
            raise KafkaException(got.error)
        if got.offset >= 0:
            return int(got.offset)
        low, _ = patient("log start", committed_probe.get_watermark_offsets, tp, timeout=5,
                          cached=False, refresh=refresh)  # fmt: skip
        return int(low)

    async def gap_closed(tp: TP, first: int, expected: int | None, epoch: int) -> bool:
        """Whether a batch from ``first`` may be decided: not when it starts past ``expected``
        (the next offset to decide); then the partition is sought back (``SeekBacks``)."""
        verdict = "decide" if expected is None else seek_backs.verdict(tp, first, expected, epoch)
        if verdict == "missing":
            runtime.crash(f"batch starts at {first} after seeking back to {expected}:"
                          " records would be skipped", tp.partition, first)  # fmt: skip
        if verdict == "seek" and expected is not None:
            seek_backs.sought(tp, expected, await runtime_mod.seek_back(app, tp, expected))
            log.warning("batch.sought_back", partition=tp.partition, first_offset=first,
                        expected=expected)  # fmt: skip
        return verdict == "decide"

    async def writer_for(partition: int, first: int) -> PartitionWriter:
        writer = writers.get(partition)
        if writer is not None:
            return writer
        writer = PartitionWriter(registry, partition, intent_sig.key())
        store = runtime_mod.RocksStoreReader(ledger, partition)
        try:
            info = writer.load(store, first)
            log.info("state.loaded", partition=partition, resume_at=first, **info)
        except StateMissing as missing:
            log.warning("state.rebuilding", partition=partition, reason=str(missing))
            replayed = await asyncio.to_thread(
                lambda: writer.rebuild(replay(bootstrap, names.sku_commands, partition, first))
            )
            log.info("state.rebuilt", partition=partition, records=replayed)
        writers[partition] = writer
        return writer

    async def decide(partition: int, records: list[Any],
                     epoch: int) -> tuple[list[Any], BatchResult] | None:  # fmt: skip
        """Decide a batch in memory (no output yet): a commit may run meanwhile. The records
        decided (a redelivered head left out) and their result; None when none are to be
        decided (all redelivered, or the batch starts past a gap: see ``gap_closed``)."""
        first = records[0].offset
        tp = TP(names.sku_commands, partition)
        if partition in writers:
            expected = runtime.processed.get(tp)
        else:  # the writer's state is cut back to where consumption resumes: not past this
            expected = await asyncio.to_thread(group_committed, partition)
        if not await gap_closed(tp, first, expected, epoch):
            return None
        if expected is not None and first < expected and partition in writers:
            records = redelivered_left_out(partition, records, expected)
            if not records:
                return None
            first = records[0].offset
        writer = await writer_for(partition, first)
        batch = writer.open_batch()
        for i in range(0, len(records), CHUNK):
            writer.decide(batch, records[i : i + CHUNK])
            await asyncio.sleep(0)  # let the fetcher, the sender and a commit run
        writer.close_batch(batch, first, runtime_mod.committed_offset(app, tp))
        return records, batch

    # Output not yet sent, per partition: events and changelog records (key, value).
    pending: dict[int, tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes | None]]]] = {}

    async def send_pending(partition: int | None = None) -> None:
        """Send the held output (of one partition, or all) as producer batches."""
        for p in [partition] if partition is not None else list(pending):
            held = pending.pop(p, None)
            if held is None:
                continue
            events, changes = held
            producer = runtime_mod.transactional_producer(app, names.sku_commands, p)
            if events:
                runtime.inflight += await _send(producer, names.decisions, p, events)
            if changes:
                runtime.inflight += await _send(producer, changelog, p, changes)

    runtime.before_commit = send_pending

    async def emit(partition: int, records: list[Any], batch: BatchResult) -> None:
        """Hand a decided batch's output to its transaction, mark it processed (under the gate).

        Decisions and changelog records are held and sent as producer batches per partition
        right before the commit (or once many are held): they count only after the commit, and
        aiokafka sends one request per broker at a time, so sending each small batch on its
        own cost a produce round trip per batch (~1,000 batches/s at 4,000 intents/s).
        """
        events, changes = pending.setdefault(partition, ([], []))
        events += batch.events
        # State writes: the local RocksDB of the partition now, the changelog records with the
        # decisions, on the partition's transactional producer itself. (Through Faust's table
        # API the records go via its ProducerBuffer, whose flush gives up after 0.1 s per
        # record: a record could slip into the next transaction, after its offsets were
        # committed.)
        db = runtime_mod.partition_db(ledger, partition)
        if runtime.fault is not None:  # tests: a full disk fails this write
            runtime.maybe_fault("state-write", partition, records[0].offset, records[-1].offset)
        for key, value in batch.writes:
            if value is None:
                db.delete(key)
            else:
                db.put(key, value)
        changes += batch.writes
        if batch.dead_letters:
            await send_pending(partition)  # the dead letters after what came before them
            producer = runtime_mod.transactional_producer(app, names.sku_commands, partition)
            runtime.inflight += await _send_dead_letters(producer, names, partition,
                                                         batch.dead_letters)  # fmt: skip
        if runtime.fault is not None:  # tests: send, make it visible, maybe fault
            await send_pending(partition)
            await runtime_mod.transactional_producer(app, names.sku_commands, partition).flush()
            rewind = runtime.maybe_fault("mid-batch", partition, records[0].offset,
                                         records[-1].offset)  # fmt: skip
            if rewind is not None:  # on the consumer's own thread, as Faust's seeks are
                await app.consumer.seek_wait({TP(names.sku_commands, partition): rewind})
        elif len(events) + len(changes) >= HOLD_MAX:
            await send_pending(partition)
        tp = TP(names.sku_commands, partition)
        runtime.processed[tp] = records[-1].offset + 1
        log.debug("batch.decided", partition=partition, first_offset=records[0].offset,
                  last_offset=records[-1].offset, records=len(records),
                  facts=len(batch.events), dead_letters=len(batch.dead_letters))  # fmt: skip
        runtime.work.set()
        st = runtime.stats
        st["batches"] += 1
        st["records"] += len(records)
        totals = runtime.totals
        totals["batches"] += 1
        totals["records"] += len(records)
        totals["decisions"] += len(batch.events)
        totals["dead_letters"] += len(batch.dead_letters)
        lag = time.time() - records[0].timestamp / 1000
        st["fetch_lag_s_max"] = max(st["fetch_lag_s_max"], lag)

    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{app_id}-probe",
                      "enable.auto.commit": False, "log_level": 3})  # fmt: skip

    probe_refresh = functools.partial(probe.list_topics, names.sku_commands, timeout=5)

    def end_offsets() -> dict[TP, int]:
        """The broker's end offsets of the command partitions this worker is assigned."""
        ends = {}
        for tp in list(app.consumer.assignment()):
            if tp.topic == names.sku_commands:
                at = TopicPartition(tp.topic, tp.partition)
                _, high = patient("end", probe.get_watermark_offsets, at, timeout=5,
                                   cached=False, refresh=probe_refresh)  # fmt: skip
                ends[tp] = high
        return ends

    runtime.end_offsets = end_offsets
    runtime.group_committed = lambda tp: runtime_mod.committed_offset(app, tp)

    @app.task
    async def watchdog() -> None:
        await runtime.watchdog()

    @app.task
    async def committer() -> None:
        await runtime.committer(app.consumer.commit, commit_ms / 1000)

    @app.agent(commands, concurrency=1)
    async def decide_commands(stream: faust.StreamT[bytes]) -> None:
        st = runtime.stats
        idle_since = time.monotonic()
        async for event in stream.events():
            msg = event.message
            records = msg.records
            began = time.monotonic()
            st["idle_s"] += began - idle_since
            try:
                done = await decide(msg.partition, records, msg.fetch_epoch)
                if done is None:
                    idle_since = time.monotonic()
                    continue
                records, batch = done
                decided = time.monotonic()
                st["decide_s"] += decided - began
                async with runtime.gate:
                    st["emit_wait_s"] += time.monotonic() - decided
                    if TP(names.sku_commands, msg.partition) not in app.consumer.assignment():
                        # Revoked while we decided: the new owner redoes the batch from the
                        # committed state; ours is ahead of it, so forget it.
                        writers.pop(msg.partition, None)
                        pending.pop(msg.partition, None)
                        log.info("batch.dropped_after_revoke", partition=msg.partition)
                        continue
                    await emit(msg.partition, records, batch)
            except asyncio.CancelledError:
                runtime.abandoned = True  # stopping mid-batch: the commit must not run
                raise
            except BaseException as exc:  # crash-only: never let Faust ack or go on
                writer = writers.get(msg.partition)
                at = writer.position if writer is not None else records[0].offset
                runtime.crash(f"{type(exc).__name__}: {exc}", msg.partition, at)
            idle_since = time.monotonic()

    return app


def redelivered_left_out(partition: int, records: list[Any], expected: int) -> list[Any]:
    """The records from ``expected`` on: those before it were decided by this writer already.

    Faust seeks a partition back to the group's committed offset when it resumes the flow
    after a rebalance (``perform_seek``), and a batch fetched before that may already have
    been decided: its records come again. Their output is committed or in the open
    transaction, so deciding them again would repeat every answer that is not idempotent by
    itself (a refused reveal refused twice, in CI) and rewrite the batch's state delta.
    """
    fresh = [r for r in records if r.offset >= expected]
    log.info("batch.redelivered", partition=partition, first_offset=records[0].offset,
             expected=expected, left_out=len(records) - len(fresh))  # fmt: skip
    return fresh


async def _send(producer: Any, topic: str, partition: int, items: list[Any]) -> list[Any]:
    """Send (key, value) items on the partition's transactional producer; return the futures.

    Many records go as whole producer batches (one append each, one future per batch). A
    few are appended to the batch already pending for the partition: aiokafka keeps one
    produce request in flight per broker and ``send_batch`` waits until the previous batch
    left, so a small batch of its own would cost a produce round trip.
    """
    futures: list[Any] = []
    if len(items) < BATCH_SEND_MIN:
        for key, value in items:
            futures.append(await producer.send(topic, value, key=key, partition=partition))
        return futures
    builder = producer.create_batch()
    for key, value in items:
        if builder.append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(builder, topic, partition=partition))
            builder = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None) is None:
                raise RuntimeError(f"a record of {len(value or b'')} bytes fits no batch")
    if builder.record_count():
        futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


async def _send_dead_letters(
    producer: Any, names: TopicNames, partition: int, dead: list[Any]
) -> list[Any]:
    """Send dead letters with their source and reason in headers; return the futures."""
    futures = []
    for d in dead:
        log.warning("record.dead_lettered", partition=partition, offset=d.offset, reason=d.reason,
                    **({"intent_id": d.intent_id} if d.intent_id else {}))  # fmt: skip
        headers = [
            ("dlq.source.topic", names.sku_commands.encode()),
            ("dlq.source.partition", str(partition).encode()),
            ("dlq.source.offset", str(d.offset).encode()),
            ("dlq.reason", d.reason.encode()),
            ("dlq.detail", d.detail.encode()[:1000]),
        ]
        builder = producer.create_batch()
        builder.append(key=d.key, value=d.value, timestamp=None, headers=headers)
        futures.append(await producer.send_batch(builder, names.dead_letters, partition=partition))
    return futures


def _crash_recorder(run_dir: Path) -> Any:
    def record(partition: int | None, offset: int | None, reason: str) -> None:
        try:
            from infra.supervisor import record_crash
        except ImportError:
            return
        record_crash(run_dir, "processor", -1 if partition is None else partition,
                     -1 if offset is None else offset, reason)  # fmt: skip

    return record


def ensure_topics(settings: Settings, bootstrap: str) -> None:
    """Create and verify every topic the worker reads or writes, its changelog included."""
    from infra import provision

    _, drift = provision.ensure_topics(bootstrap, catalogue(settings))
    wrong = [d for d in drift if "partitions" in d]
    if wrong:
        raise SettingError("topics do not match the catalogue: " + "; ".join(wrong))
    provision.wait_until_led(bootstrap, catalogue(settings))  # before the group forms


def main(settings: Settings, bootstrap: str, loglevel: str = "warn") -> None:
    """Run one inventory worker until SIGTERM/SIGINT (or a crash: exit code 70)."""
    runtime_mod.check_versions()
    ensure_topics(settings, bootstrap)
    app = build_app(settings, bootstrap)
    runtime: BatchRuntime = app.flashsale_runtime  # type: ignore[attr-defined]
    metrics = ServiceMetrics(settings, "processor")
    metrics.stats(lambda: dict(runtime.totals))
    metrics.lag(bootstrap, app.conf.id, [TopicNames.of(settings).sku_commands])
    worker = runtime_mod.QuietWorker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Everything built so far lives as long as the process: keep it out of the cyclic GC's
    # full collections, and collect young objects less often (a batch allocates thousands).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    # The aiokafka consumer runs in a thread of its own: every fetch hands records across
    # the GIL. At the default 5 ms switch interval the busy main thread kept that thread
    # waiting (records sat fetched 100-180 ms on average at 5,000 intents/s; 23-41 ms at 0.5).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    with metrics.serving():
        worker.execute_from_commandline()
