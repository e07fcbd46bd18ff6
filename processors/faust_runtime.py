"""Every touch of Faust's internals, in one place: a batch transport and a crash-only worker.

faust-streaming is pinned (``FAUST_VERSION``) and checked at start-up: the subclasses and
patches below were written against that version's source and are wrong for any other.

What the writer needs from Faust, and where Faust falls short:

* **One event per fetched partition batch** (``BatchConsumer.getmany``). Faust delivers one
  event per record through a conductor, a channel and a stream; at ~50 µs of Python per
  record that alone caps a worker far below our target. The batch transport hands the agent
  one event per partition per fetch, carrying the raw aiokafka records. Changelog topics (table
  recovery) keep Faust's per-record path.
* **Offsets committed only for whole processed batches** (``BatchConsumer._new_offset``).
  Faust acks an event when the agent moves on *or crashes* (``_execute_actor`` restarts the
  actor at N+1, ``streams.pyx`` acks N in a ``finally``), so a record whose processing raised
  was committed as done. For batch topics the committable offset is ``BatchRuntime.processed``,
  set by the agent only after a batch's decisions were sent and its state written.
* **A transaction per set of whole batches** (``GatedTransactionManager.commit``). Faust's
  commit timer may fire while the agent is between two awaits of a batch; the commit then
  holds part of a batch's output with the offsets of the batch before it, and a crash repeats
  that output (the 186 byte-identical repeats seen after a SIGKILL). The commit waits on
  ``BatchRuntime.gate``, which the agent holds for a whole batch.
* **Crash-only.** Faust swallows ``ProducerFenced`` in ``begin_transaction`` and crashes the
  app into a state where it stays up doing nothing. Here any service crash, a failed commit
  and any unexpected exception in the agent log partition, offset and reason and exit the
  process at once (``os._exit``) without committing: the open transaction aborts and the
  records are redelivered to the replacement the supervisor starts.

The commit protocol (``GatedTransactionManager.commit``), in steps:

1. Wait for the batch gate: no batch is half-processed while we commit. Take each
   partition's offset to commit *now*, under the gate (Faust computed its offsets before
   waiting; a batch finished meanwhile is in the transaction and its offset must be too).
2. If a batch was abandoned half-way (the agent was cancelled mid-batch), exit without
   committing.
3. Send the decisions and changelog records the agent holds, then wait for every record sent in
   this transaction (decisions, dead letters, changelog records) to be acknowledged: aiokafka
   would commit a transaction whose produce request failed.
4. For every partition's transactional producer at once: send the processed offsets, commit
   the transaction, begin the next one (aiokafka sends queued decision batches before EndTxn).
5. Any error in 3-4 (fenced, timed out, broker gone): exit without committing further.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import traceback
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, cast

import aiokafka
import faust
import mode
import structlog
from faust.tables import recovery as faust_recovery
from faust.transport.consumer import TransactionManager
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, ConsumerMessage, Message

from processors.batch_runtime import BatchRuntime

log = structlog.get_logger(__name__)

FAUST_VERSION = "0.15.3"
AIOKAFKA_VERSION = "0.14.0"
SCHEME = "flashsale-batch"
FETCH_MAX_WAIT_MS = 20
# aiokafka asks for 1 byte: under a trickle every fetch came back with a record or two, and at
# 400 intents/s the worker spent 0.72 of a core; 64 KiB (still at most 20 ms) halved that.
FETCH_MIN_BYTES = 64 * 1024
RECOVERY_IDLE_S = 0.5
FAUST_COMMIT_BACKSTOP_S = 5.0  # Faust's own commit timer; BatchRuntime.committer commits sooner


class UnsupportedFaust(RuntimeError):
    """The installed faust-streaming/aiokafka is not the version this module was written for."""


def check_versions() -> None:
    """Refuse to run on a Faust or aiokafka this module was not written against."""
    found = (faust.__version__, aiokafka.__version__)
    if found != (FAUST_VERSION, AIOKAFKA_VERSION):
        raise UnsupportedFaust(
            f"processors/faust_runtime.py patches faust-streaming {FAUST_VERSION} with aiokafka "
            f"{AIOKAFKA_VERSION}, found faust-streaming {found[0]} with aiokafka {found[1]}; "
            f"install the pinned versions (pip install -e .) or review the patches first"
        )


def runtime_of(app: Any) -> BatchRuntime:
    """The BatchRuntime installed on ``app``."""
    return app.flashsale_runtime


class BatchMessage(ConsumerMessage):
    """One fetched batch of a partition: ``records`` are aiokafka ConsumerRecords; its fetch
    began at ``fetch_epoch`` (``BatchConsumer.seek_epoch``, see ``seek_back``)."""

    records: list[Any]
    fetch_epoch: int = 0


class BatchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread with a short broker fetch wait and a 64 KiB fetch minimum.

    Faust hard-codes ``fetch_max_wait_ms=1500``, and aiokafka keeps one fetch in flight per
    broker: a fetch sent while the hot partition still had buffered records covers only the
    idle partitions, the broker holds it 1.5 s, and the hot partition's next fetch waits
    behind it. Measured: ~1.2 s idle after every 6,000 records (under 6,000 decisions/s).
    """

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        return consumer

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        """Faust's changelog ends, asking the broker when the last stable offset is unknown.

        Under exactly-once Faust takes a changelog partition's end from aiokafka's cached last
        stable offset, which is None until that partition's first fetch after an assignment;
        Faust reads None as "ends at -1" (``_build_highwaters``), and a worker with a persisted
        offset above that crashed with ``ConsistencyError`` (seen on scale-out: the worker that
        kept a changelog partition across the rebalance). ``end_offsets`` asks the broker
        (ListOffsets under read_committed: the last stable offset).
        """
        ends = dict(await super()._highwaters(partitions))
        unknown = [tp for tp, end in ends.items() if end is None]
        if unknown:
            ends.update(await self._ensure_consumer().end_offsets(unknown))
            log.info("recovery.ends_asked", partitions=len(unknown))
        return ends


class BatchConsumer(faust_aiokafka.Consumer):
    """aiokafka consumer delivering one message per partition batch for the batch topic."""

    _buffer_drained: asyncio.Event | None = None
    seek_epoch = 0  # counts completed ``seek_back`` calls

    def _new_consumer_thread(self) -> BatchConsumerThread:
        return BatchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def on_buffer_drop(self, tp: TP) -> None:
        super().on_buffer_drop(tp)
        if self._buffer_drained is not None:
            self._buffer_drained.set()

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        """Faust's, except when every partition is held back by a full stream buffer.

        Faust takes a partition out of its fetch set while the agent's stream buffer is under
        pressure (``Conductor.on_pressure_high``, at 51 of 64 batches) and, once no partition
        is left, sleeps a whole second (``faust/transport/consumer.py`` ``_wait_next_records``,
        ``await self.sleep(1)``) however soon the buffer drains. Measured at 5,000 intents/s:
        records sat fetched for up to 1.0-1.1 s, so decisions came in waves 1 s apart. Here
        the wait ends as soon as the buffer drops (``on_buffer_drop``).
        """
        if self.flow_active and not self.app.client_only and not self._get_active_partitions():
            if self._buffer_drained is None:
                self._buffer_drained = asyncio.Event()
            self._buffer_drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._buffer_drained.wait(), timeout)
            return {}, self._get_active_partitions()
        return await super()._wait_next_records(timeout)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        """Like Faust's, but batch-topic partitions yield one ``BatchMessage`` per fetch."""
        epoch = self.seek_epoch
        records, active = await self._wait_next_records(timeout)
        if records is None or self.should_stop:
            return
        if not self.flow_active:
            await self.perform_seek()
            return
        runtime = runtime_of(self.app)
        batch_topic = runtime.batch_topic
        generation = self.app.consumer_generation_id
        for tp, recs in records.items():
            if not self.flow_active or self.app.consumer_generation_id != generation:
                break
            if active is not None and tp not in active and tp not in self._buffered_partitions:
                continue
            if tp.topic == batch_topic:
                if recs and not runtime.lost_in_fetch(tp, recs[0].offset, recs[-1].offset):
                    # Faust's fetch loop drops a message below the partition's read offset,
                    # which it sets from each message after handing it on. A batch fetched
                    # before a seek back, waiting on a full stream buffer, set it past the
                    # seek: the batches fetched again were dropped unseen, a partition's
                    # records skipped. Batch offsets are ours (``processed``, ``SeekBacks``).
                    self._read_offset[tp] = None
                    yield tp, self._batch_message(tp, recs, generation, epoch)
            else:
                for record in recs:
                    yield tp, self._to_message(tp, record)

    def _batch_message(self, tp: TP, recs: list[Any], generation: int,
                       epoch: int) -> BatchMessage:  # fmt: skip
        last = recs[-1]
        msg = BatchMessage(tp.topic, tp.partition, last.offset, last.timestamp / 1000.0,
                           last.timestamp_type, None, None, b"", None, 0, 0, tp,
                           generation_id=generation)  # fmt: skip
        msg.records = recs
        msg.fetch_epoch = epoch
        return msg

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        # Faust clears its ack lists of every partition when a rebalance starts, before its
        # last commit: a partition processed since the previous commit must still be in it,
        # or its output would stay in an open transaction and be redone by the next owner.
        runtime = runtime_of(self.app)
        tps = set(super()._filter_tps_with_pending_acks(topics))
        tps.update(
            tp for tp in runtime.processed
            if topics is None or tp in topics or tp.topic in topics
        )  # fmt: skip
        return iter(tps)

    def _new_offset(self, tp: TP) -> int | None:
        if tp.topic != runtime_of(self.app).batch_topic:
            return super()._new_offset(tp)
        self._acked[tp].clear()
        self._acked_index[tp].clear()
        return runtime_of(self.app).processed.get(tp)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Consecutive batch messages look like gaps to Faust; their offsets are ours to track.
        if tp.topic != runtime_of(self.app).batch_topic:
            await super()._add_gap(tp, offset_from, offset_to)


class GatedTransactionManager(TransactionManager):
    """Faust's transaction manager, committing only whole batches (steps in the module doc)."""

    async def commit(self, offsets: Any, start_new_transaction: bool = True) -> bool:
        """Commit processed offsets with everything the batches before them produced."""
        runtime = runtime_of(self.app)
        asked = time.monotonic()
        async with runtime.gate:  # step 1
            began = time.monotonic()
            if runtime.abandoned:  # step 2
                runtime.crash("a batch was abandoned half-way; not committing it")
            # Faust computed ``offsets`` before we got the gate; batches finished since then
            # have output in these transactions, so their offsets must be committed with it.
            # Updated in place: it is Faust's own dict, which it records as committed.
            for tp in offsets:
                if tp.topic == runtime.batch_topic and tp in runtime.processed:
                    offsets[tp] = runtime.processed[tp]
            try:
                await runtime.before_commit()  # step 3: held output, then every send's ack
                sent, runtime.inflight = runtime.inflight, []
                await asyncio.gather(*sent)  # a failed send fails the commit (aiokafka would not)
                by_tid: dict[str, dict[TP, int]] = defaultdict(dict)
                for tp, offset in offsets.items():
                    group = self.app.assignor.group_for_topic(tp.topic)
                    by_tid[f"{self.app.conf.id}-{group}-{tp.partition}"][tp] = offset
                if runtime.fault is not None:  # tests: make the work in flight visible first
                    await self.producer.flush()
                    for tp, offset in offsets.items():
                        if tp.topic == runtime.batch_topic:
                            runtime.maybe_fault("before-commit", tp.partition, 0, offset - 1)
                # step 4: every partition's transaction at once (Faust commits them one by
                # one: with 6 partitions that held the gate 6 round trips long, ~50 ms).
                await asyncio.gather(*(
                    self._commit_one(tid, offs, start_new_transaction)
                    for tid, offs in by_tid.items()
                ))  # fmt: skip
            except BaseException as exc:  # step 5 (a cancelled commit may have lost held output)
                runtime.crash(f"commit failed: {type(exc).__name__}: {exc}")
            runtime.last_commit = done = time.monotonic()
            runtime.committed.update(offsets)
            st = runtime.stats
            st["commits"] += 1
            st["commit_s"] += done - began
            runtime.totals["commits"] += 1
            runtime.totals["commit_seconds"] += done - began
            st["gate_wait_s"] += began - asked
            runtime.after_commit(offsets)
        return True

    async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any) -> None:
        """Faust's, after stopping every transactional producer whose partition is not
        active now.

        With standby replicas Faust marks the input topic's partitions as standbys too
        (``client_assignment.add_copartitioned_assignment``), and ``_tps_to_active_tpgs``
        drops standbys: a partition revoked to become a standby kept its producer. The new
        owner's InitProducerId fenced that producer; when the partition came back, Faust's
        ``begin_transaction`` found and reused it, and the first commit failed as fenced
        (a crash and a restart on every failover). Stopped here, a partition that comes back
        gets a new producer, whose InitProducerId fences any previous owner, as without
        standbys. The revoke phase committed these partitions' offsets before this runs."""
        producer: Any = self.producer
        active = self._tps_to_transactional_ids(assigned)
        for tid in sorted(set(producer._transaction_producers) - active):
            log.info("txn.producer_dropped", transactional_id=tid)
            await producer.stop_transaction(tid)
        await super().on_rebalance(assigned, revoked, newly_assigned)

    async def _commit_one(self, tid: str, offsets: dict[TP, int], begin_next: bool) -> None:
        producer: Any = self.producer
        txn = producer._transaction_producers.get(tid)
        if txn is None:
            raise RuntimeError(f"no transactional producer {tid} (fenced or stopped)")
        # aiokafka wants its own TopicPartition keys: Faust's TP (an equal tuple, but another
        # class) comes in for a partition only our processed offsets name (a commit as a
        # rebalance starts), and aiokafka refused it: the worker crashed on every scale-out.
        keyed = {faust_aiokafka.ensure_aiokafka_TP(tp): o for tp, o in offsets.items()}
        async with producer._trn_locks[tid]:
            await txn.send_offsets_to_transaction(keyed, self.app.conf.id)
            await txn.commit_transaction()
            if begin_next:
                await txn.begin_transaction()


class BoundedTransactionProducer(faust_aiokafka.Producer):
    """Faust's producer with our transaction timeout (Faust leaves aiokafka's 60 s).

    A worker paused past this timeout (SIGSTOP, a long GC, a frozen VM) has its transaction
    aborted by the broker and its producer epoch bumped: its next commit fails as fenced and
    the runtime exits, instead of a zombie committing late.
    """

    def _settings_extra(self) -> Any:
        extra = dict(super()._settings_extra())
        extra["transaction_timeout_ms"] = runtime_of(self.app).transaction_timeout_ms
        return extra


class BatchTransport(faust_aiokafka.Transport):
    """The aiokafka transport with the batch consumer and the gated transaction manager."""

    Consumer = BatchConsumer
    Producer = BoundedTransactionProducer
    TransactionManager = GatedTransactionManager


class _RecoveryAsyncio:
    """``asyncio`` as seen by faust/tables/recovery.py, with a short changelog idle wait.

    Under exactly-once every changelog partition ends in a transaction marker, which is never
    delivered as a record, so Faust's recovery only sees it has reached the end after two idle
    waits of ``asyncio.wait_for(changelog_queue.get(), timeout=5.0)`` (recovery.py, the
    ``detect_aborted_tx`` path): 10 s added to every start. The cap makes that ~2 x 0.5 s;
    the end is still only declared when the consumer's position has passed the highwater.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(aw: Any, timeout: float | None) -> Any:
        capped = timeout if timeout is None else min(timeout, RECOVERY_IDLE_S)
        return await asyncio.wait_for(aw, capped)


class _RecoveryLogger:
    """faust/tables/recovery.py's logger, turning a swallowed recovery error into a crash.

    ``Recovery._slurp_changelogs`` wraps each turn of its loop in ``except Exception as ex:
    logger.warning(f"Error in recovery {ex}")`` and goes on: a changelog record that could not
    be applied (a RocksDB write error, a broken record) is skipped (its offset already counted)
    and the table is silently wrong. Crash-only: that warning exits the worker instead.

    One exception is Faust's own race, excused: ``detect_aborted_tx`` (run only on an idle turn,
    when no record is in hand) awaits ``consumer.position`` while iterating the active
    highwaters, which a rebalance changes meanwhile ("dictionary changed size during
    iteration", seen when a second worker joined mid-sale). Nothing was skipped; the next idle
    turn runs it again. Only that error from that function is excused, and at most
    ``EXCUSED_MAX`` times a minute: a check failing on every turn exits the worker all the same.
    """

    EXCUSED_MAX = 20
    EXCUSE_WINDOW_S = 60.0

    def __init__(self, inner: Any, runtime: BatchRuntime) -> None:
        self._inner = inner
        self._runtime = runtime
        self.excused: deque[float] = deque()  # monotonic times of the excused errors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._inner.warning(msg, *args, **kwargs)
        if not (isinstance(msg, str) and msg.startswith("Error in recovery")):
            return
        if self._excusable(*sys.exc_info()[1:]):
            log.warning("recovery.aborted_tx_check_failed", error=msg, excused=len(self.excused))
            return
        self._runtime.crash(f"changelog recovery failed: {msg}")

    def _excusable(self, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if not (
            isinstance(exc, RuntimeError)
            and "changed size during iteration" in str(exc)
            and _raised_in(tb, "detect_aborted_tx")
        ):
            return False
        now = time.monotonic()
        while self.excused and now - self.excused[0] > self.EXCUSE_WINDOW_S:
            self.excused.popleft()
        self.excused.append(now)
        return len(self.excused) <= self.EXCUSED_MAX


def _raised_in(tb: TracebackType | None, function: str) -> bool:
    """Whether a traceback passes through ``function`` of Faust's recovery module."""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == function and code.co_filename == faust_recovery.__file__:
            return True
        tb = tb.tb_next
    return False


def install(app: faust.App, runtime: BatchRuntime) -> None:
    """Register the transport (``flashsale-batch://``), attach the runtime, make crashes exit."""
    check_versions()
    faust_recovery.asyncio = _RecoveryAsyncio()  # type: ignore[assignment]
    inner = getattr(faust_recovery.logger, "_inner", faust_recovery.logger)
    faust_recovery.logger = _RecoveryLogger(inner, runtime)  # type: ignore[assignment]
    TRANSPORTS.data[SCHEME] = f"{__name__}:BatchTransport"  # Faust's own transport registry
    app.flashsale_runtime = runtime  # type: ignore[attr-defined]

    async def crash(self: mode.Service, reason: BaseException) -> None:
        # mode.Service.crash would stop the service tree and leave the process up, idle.
        text = "".join(traceback.format_exception_only(type(reason), reason)).strip()
        runtime.crash(f"{type(self).__name__} crashed: {text}")

    mode.Service.crash = crash  # type: ignore[method-assign]


def transactional_producer(app: faust.App, topic: str, partition: int) -> Any:
    """The aiokafka producer whose transaction covers ``partition`` of consumed ``topic``."""
    group = app.assignor.group_for_topic(topic)
    tid = f"{app.conf.id}-{group}-{partition}"
    producer = app.producer._transaction_producers.get(tid)  # type: ignore[attr-defined]
    if producer is None:
        raise RuntimeError(f"no transactional producer {tid} (fenced or not started)")
    return producer


class RocksStoreReader:
    """Read one table partition's RocksDB directly (``processors.state_layout.StoreReader``)."""

    def __init__(self, table: Any, partition: int) -> None:
        self._db = partition_db(table, partition)

    @classmethod
    def over(cls, db: Any) -> RocksStoreReader:
        """A reader over an open rocksdict (the store contract tests use one of their own)."""
        reader = cls.__new__(cls)
        reader._db = db
        return reader

    def get(self, key: bytes) -> bytes | None:
        """Value of ``key`` or None."""
        value = self._db.get(key)
        return None if value is None else bytes(value)

    def keys_from(self, prefix: bytes) -> Iterator[bytes]:
        """Keys with ``prefix``, sorted (a snapshot list: callers may delete while iterating)."""
        it = self._db.iter()
        it.seek(prefix)
        keys = []
        while it.valid():
            key = bytes(it.key())
            if not key.startswith(prefix):
                break
            keys.append(key)
            it.next()
        return iter(keys)

    def discard(self, key: bytes) -> None:
        """Delete locally only: used for leftovers of transactions that never committed."""
        self._db.delete(key)


class QuietWorker(faust.Worker):
    """Faust's worker without its terminal spinner (it writes escape codes into our logs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None


def partition_db(table: Any, partition: int) -> Any:
    """The rocksdict of one partition of a Faust RocksDB table (writes bypass Faust)."""
    return table.data._db_for_partition(partition)


def committed_offset(app: faust.App, tp: TP) -> int | None:
    """The input offset the group last committed for ``tp`` (Faust's bookkeeping)."""
    return app.consumer._committed_offset.get(tp)  # type: ignore[attr-defined]


async def seek_back(app: faust.App, tp: TP, offset: int) -> int:
    """Seek ``tp`` back to ``offset`` on the consumer's own thread (as Faust's seeks are) and
    return the new seek epoch: a batch whose ``fetch_epoch`` is at least that was fetched by a
    fetch that began after this seek had taken effect."""
    consumer = cast(BatchConsumer, app.consumer)
    await consumer.seek_wait({tp: offset})
    consumer.seek_epoch += 1
    return consumer.seek_epoch
