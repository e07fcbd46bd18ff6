"""The projection runner: every projection is a ``rows`` + ``write`` pair run by this loop.

One loop for every read model (orders/outcomes/counters today, analytics next):

1. consume a batch (read_committed) from the projection's topics;
2. decode each record once; records whose schema the projection passes over are skipped by
   fingerprint, undecodable ones are logged and skipped (the writer dead-letters them);
   ``projection.rows`` (pure) turns the batch into rows;
3. in **one PostgreSQL transaction**: lock the projection's tracking rows
   (``projection_offsets``, in sorted order), drop records below the tracked offsets (a
   racing instance projected them already: the rows are then made again from the rest),
   ``projection.write`` (the store), and move the tracking offsets forward;
4. commit the consumer offsets asynchronously (for lag monitoring only: PostgreSQL holds the
   position) and, on assignment, seek to the tracked offsets.

**Pipelined.** Step 3 runs on a writer thread while the main thread does steps 1-2 for the
next batch: decoding is Python, the write is mostly waiting for PostgreSQL, so on two cores
the two overlap (one after the other, the projector was ~12,000 decisions/s here; see the
README's figures). At most one batch is in flight, and batches are written in the order they
were consumed. Before a rebalance callback touches offsets, ``close`` leaves the group, or a
caught-up check or ``positions`` answers, the batch in flight is finished. An error in the
writer is raised in the main thread at its next step, and the runner is then spent (every
later ``poll_batch`` raises): the batch decoded meanwhile is past the consumer's position, so
going on would skip it. The process fails as it would have without the thread.

The pipeline needs a short GIL switch interval (``SWITCH_INTERVAL_S``); it is a setting of
the whole process, so the composition roots set it (``use_short_switch_interval``).

A crash anywhere replays at most the uncommitted batches. ``stop`` (SIGTERM) first projects
what the log holds at that moment, for at most ``DRAIN_S``; ``run_until_caught_up`` projects
to the end offsets seen at its start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import confluent_kafka
import psycopg
import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from flashsale.kafka_auth import Consumer
from schemas.codec import SchemaRegistry, UndecodableRecord, default_registry

log = structlog.get_logger(__name__)


def _fault_batches(raw: str | None) -> int | None:
    """Tests only: ``FLASHSALE_PROJECTION_FAULT=N`` SIGKILLs the process in the Nth batch that
    wrote rows, after its rows and offsets were written, before the transaction commits."""
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"FLASHSALE_PROJECTION_FAULT={raw!r}: want a batch count of 1 or more")
    return int(raw)


def _kill_before_commit(name: str, written: int) -> None:
    log.warning("fault.injected", projection=name, point="before-commit", rows=written)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# The writer thread waits for PostgreSQL with the GIL released, and on each return (about ten
# round trips a batch) needs it back from the main thread, which is decoding. By default
# Python hands the GIL over only every 5 ms: the pipeline ran nearly serial again (~20,700
# decisions/s against ~30,000 at 0.2 ms, side by side on a 200,000-decision sale).
SWITCH_INTERVAL_S = 0.0002


def use_short_switch_interval() -> None:
    """Set this process's GIL switch interval for the pipelined runner (composition roots)."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


DRAIN_S = 5.0


class ProjectionError(RuntimeError):
    """The projection cannot go on (a fatal Kafka error, or not caught up in time)."""


@dataclass(slots=True)
class _Batch:
    """A consumed batch on its way to PostgreSQL."""

    decoded: list[Decoded]
    offsets: dict[tuple[str, int], int]  # next offset per partition after this batch
    rows: Sized  # the rows of every decoded record (remade if some were projected already)
    records: int  # messages consumed
    undecodable: int


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded record and where it sits in the log."""

    topic: str
    partition: int
    offset: int
    name: str
    record: dict[str, Any]
    timestamp: int = 0  # the record's log time (epoch ms)


class Projection(Protocol):
    """A read model: which topics it reads, how records become rows, how rows are stored."""

    name: str  # the tracking name its offsets are stored under
    topics: tuple[str, ...]
    passes_over: frozenset[bytes]  # schema fingerprints never decoded (nothing to project)

    def rows(self, records: Sequence[Decoded]) -> Sized:
        """The batch's rows (pure: no I/O)."""
        ...

    def write(self, conn: psycopg.Connection, rows: Any) -> int:
        """Store ``rows`` inside the runner's transaction; return rows written."""
        ...


_ENSURE_SQL = """
INSERT INTO projection_offsets (projection, topic, partition, next_offset)
SELECT %s, t, p, 0 FROM unnest(%s::text[], %s::int[]) AS x(t, p)
ON CONFLICT DO NOTHING
"""
_LOCK_SQL = """
SELECT topic, partition, next_offset FROM projection_offsets
WHERE projection = %s AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))
ORDER BY topic, partition FOR UPDATE
"""
# greatest(): never go back, whichever instance committed last.
_ADVANCE_SQL = """
UPDATE projection_offsets o SET next_offset = greatest(o.next_offset, x.n), updated_at = now()
FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS x(t, p, n)
WHERE o.projection = %s AND o.topic = x.t AND o.partition = x.p
"""


def read_offsets(
    conn: psycopg.Connection, projection: str, topics: Sequence[str]
) -> dict[tuple[str, int], int]:
    """Tracked next offsets of ``projection`` for ``topics``, by (topic, partition)."""
    rows = conn.execute(
        "SELECT topic, partition, next_offset FROM projection_offsets"
        " WHERE projection = %s AND topic = ANY(%s)",
        (projection, list(topics)),
    ).fetchall()
    return {(t, p): o for t, p, o in rows}


class ProjectionRunner:
    """Runs one projection: Kafka in, PostgreSQL out, rows and offsets in one transaction."""

    def __init__(
        self,
        bootstrap: str,
        dsn: str,
        projection: Projection,
        *,
        group_id: str,
        batch_size: int = 2000,
        poll_timeout: float = 0.5,
        registry: SchemaRegistry | None = None,
        search_path: str | None = None,
    ) -> None:
        self.projection = projection
        self.name = projection.name
        self.topics = projection.topics
        self._dsn = dsn
        self._search_path = search_path
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._registry = registry or default_registry()
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group_id,
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "log_level": 3,
            }
        )
        self._next: dict[tuple[str, int], int] = {}  # next offset per assigned partition
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"projection-{self.name}")
        self._in_flight: tuple[_Batch, Future[int]] | None = None
        self._failed: BaseException | None = None  # a write failed: this runner is spent
        self._subscribed = False
        self._kill_in = _fault_batches(os.environ.get("FLASHSALE_PROJECTION_FAULT"))
        self.rows_written = 0
        self.records_seen = 0
        self.batches = 0
        self.undecodable = 0
        self.busy_seconds = 0.0  # polls with work, minus idle consume waits: rows / this = rate

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Connect to PostgreSQL and subscribe; partitions arrive with the first consume."""
        if self._conn is None:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
            if self._search_path is not None:
                self._conn.execute(
                    "SELECT set_config('search_path', %s, false)", (self._search_path,)
                )
        if not self._subscribed:
            self._consumer.subscribe(
                list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            self._subscribed = True

    def backend_pid(self) -> int:
        """The pid of the PostgreSQL backend this runner writes through (CPU accounting)."""
        self.start()
        assert self._conn is not None
        return self._conn.info.backend_pid

    def stats(self) -> dict[str, float]:
        """Counters for the service's metrics (read from another thread: plain numbers)."""
        return {"records": self.records_seen, "rows": self.rows_written,
                "batches": self.batches, "undecodable": self.undecodable,
                "busy_seconds": self.busy_seconds}  # fmt: skip

    def stop(self) -> None:
        """Ask ``run`` to return after the current batch (and a short drain, ``_drain``)."""
        self._stop.set()

    def close(self) -> None:
        """Finish the batch in flight, leave the group and close the PostgreSQL connection."""
        try:
            self._finish()
        finally:
            self._writer.shutdown()  # nothing is written after this instance leaves the group
            self._consumer.close()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Project batches until ``stop_event`` (or ``stop()``) is set, then close."""
        stop = stop_event or self._stop
        self.start()
        log.info("projection.started", projection=self.name, topics=list(self.topics))
        try:
            while not (stop.is_set() or self._stop.is_set()):
                self.poll_batch()
            self._drain()
        finally:
            self.close()
            log.info("projection.stopped", projection=self.name, rows=self.rows_written)

    def _drain(self) -> None:
        """On a graceful stop, project what the log holds now (for at most ``DRAIN_S``): the
        services that write our topics stop first, so a stopped projection stands at the
        end of its topics and a replay can compare with it."""
        try:
            self.run_until_caught_up(timeout=DRAIN_S)
        except (ProjectionError, KafkaException) as exc:  # the rest waits for the next run
            log.warning("projection.not_drained", projection=self.name, error=str(exc))

    def run_until_caught_up(
        self, timeout: float = 30.0, on_batch: Callable[[int, int], None] | None = None
    ) -> int:
        """Project until every partition reaches its end offset as of this call.

        Returns the rows written meanwhile; ``on_batch(done, total)`` is called after each
        batch with offsets projected and offsets to reach. The consumer stays open.
        """
        self.start()
        deadline = time.monotonic() + timeout
        targets = self._high_watermarks(timeout)
        before = self.rows_written
        while not self._caught_up(targets):
            if time.monotonic() > deadline:
                raise ProjectionError(f"{self.name} not caught up after {timeout}s")
            self.poll_batch()
            if on_batch is not None:
                done = sum(min(self._next.get(tp, 0), end) for tp, end in targets.items())
                on_batch(done, sum(targets.values()))
        return self.rows_written - before

    def positions(self) -> dict[tuple[str, int], int]:
        """Next offset to project per assigned partition (what the tracking rows say too).

        Finishes the batch in flight first: call it from the thread that polls."""
        self._finish()
        return dict(self._next)

    # -- one batch ---------------------------------------------------------------------
    def poll_batch(self) -> int:
        """Consume and decode one batch, finish the one in flight, hand this one to the writer.

        Returns the rows of the batches finished meanwhile (the previous one, or this one's
        predecessor when nothing new came in: an empty poll drains the pipeline).
        """
        if self._failed is not None:
            raise ProjectionError(f"{self.name}: a write failed; restart") from self._failed
        before, began = self.rows_written, time.monotonic()
        messages = self._consumer.consume(self._batch_size, self._poll_timeout)
        consumed = time.monotonic()
        batch = self._prepare(messages) if messages else None
        had_work = batch is not None or self._in_flight is not None
        self._finish()
        if batch is not None:
            self._in_flight = (batch, self._writer.submit(self._write, batch))
        if had_work:  # an empty consume's wait is idle time, not work
            self.busy_seconds += time.monotonic() - (began if messages else consumed)
        return self.rows_written - before

    def _prepare(self, messages: list[Message]) -> _Batch | None:
        decoded, offsets, undecodable = self._decode(messages)
        if not offsets:
            return None
        rows = self.projection.rows(decoded)
        return _Batch(decoded, offsets, rows, len(messages), undecodable)

    def _write(self, batch: _Batch) -> int:
        """Steps 3 of the module docstring, on the writer thread; return rows written."""
        assert self._conn is not None
        with self._conn.transaction():
            tracked = self._lock(batch.offsets)
            fresh = [d for d in batch.decoded if d.offset >= tracked.get((d.topic, d.partition), 0)]
            if len(fresh) < len(batch.decoded):
                batch.rows = self.projection.rows(fresh)  # a racing instance was here first
            written = self.projection.write(self._conn, batch.rows) if len(batch.rows) else 0
            self._advance(batch.offsets)
            if self._kill_in is not None and written:  # tests: rows written, not committed
                self._kill_in -= 1
                if self._kill_in == 0:
                    _kill_before_commit(self.name, written)
        log.debug(  # ~10 a second while catching up: too many for info
            "projection.batch",
            projection=self.name,
            records=batch.records,
            rows=len(batch.rows),
            written=written,
            already_projected=len(batch.decoded) - len(fresh),
            undecodable=batch.undecodable,
            partitions=len(batch.offsets),
        )
        return written

    def _finish(self) -> None:
        """Wait for the batch in flight (raising its error here) and account for it."""
        if self._in_flight is None:
            return
        batch, future = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except BaseException as exc:
            self._failed = exc
            raise
        self._next.update(batch.offsets)
        self._consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in batch.offsets.items()],
            asynchronous=True,
        )
        self.records_seen += batch.records
        self.rows_written += len(batch.rows)
        self.batches += 1
        self.undecodable += batch.undecodable

    def _decode(
        self, messages: list[Message]
    ) -> tuple[list[Decoded], dict[tuple[str, int], int], int]:
        decoded: list[Decoded] = []
        offsets: dict[tuple[str, int], int] = {}
        undecodable = 0
        skipped = self.projection.passes_over
        decode = self._registry.decode
        for msg in messages:
            if msg.error() is not None:
                self._on_kafka_error(msg)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            offsets[(topic, partition)] = offset + 1
            value = msg.value() or b""
            if value[2:10] in skipped:
                continue  # e.g. a record the projection passes over: not worth decoding
            try:
                name, record = decode(value)
            except UndecodableRecord as exc:
                undecodable += 1
                log.warning(
                    "projection.undecodable",
                    topic=topic,
                    partition=partition,
                    offset=offset,
                    reason=exc.reason,
                )
                continue
            decoded.append(Decoded(topic, partition, offset, name, record, msg.timestamp()[1]))
        return decoded, offsets, undecodable

    def _lock(self, offsets: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        assert self._conn is not None
        keys = sorted(offsets)
        columns = ([t for t, _ in keys], [p for _, p in keys])
        self._conn.execute(_ENSURE_SQL, (self.name, *columns))
        rows = self._conn.execute(_LOCK_SQL, (self.name, *columns)).fetchall()
        return {(t, p): o for t, p, o in rows}

    def _advance(self, offsets: dict[tuple[str, int], int]) -> None:
        assert self._conn is not None
        keys = sorted(offsets)
        self._conn.execute(
            _ADVANCE_SQL,
            ([t for t, _ in keys], [p for _, p in keys], [offsets[k] for k in keys], self.name),
        )

    # -- Kafka callbacks and helpers ---------------------------------------------------
    def _on_assign(
        self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        self._finish()  # its offsets are then in PostgreSQL, and the connection is free
        assert self._conn is not None
        stored = read_offsets(self._conn, self.name, self.topics)
        for tp in partitions:
            tp.offset = stored.get((tp.topic, tp.partition), OFFSET_BEGINNING)
            self._next[(tp.topic, tp.partition)] = max(tp.offset, 0)
        consumer.assign(partitions)
        log.info(
            "projection.assigned",
            projection=self.name,
            partitions=[f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions],
        )

    def _on_revoke(
        self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]
    ) -> None:
        self._finish()  # the next owner starts from what this instance wrote
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)
        consumer.unassign()

    def _on_kafka_error(self, msg: Message) -> None:
        err = msg.error()
        if err is not None and err.fatal():
            raise ProjectionError(f"fatal Kafka error: {err}")
        if err is not None and err.code() != KafkaError._PARTITION_EOF:
            log.warning("projection.kafka_error", error=str(err))

    def _high_watermarks(self, timeout: float) -> dict[tuple[str, int], int]:
        metadata = self._consumer.list_topics(timeout=timeout)
        targets = {}
        for topic in self.topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                raise ProjectionError(f"topic {topic} is not available")
            for p in meta.partitions:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=timeout
                )
                targets[(topic, p)] = high
        return targets

    def _caught_up(self, targets: dict[tuple[str, int], int]) -> bool:
        """Everything up to ``targets`` consumed (the batch in flight is then finished)."""
        consumed = dict(self._next)
        if self._in_flight is not None:
            consumed.update(self._in_flight[0].offsets)
        if set(targets) - set(consumed):
            return False  # not (yet) assigned everything
        behind = [tp for tp, high in targets.items() if consumed[tp] < high]
        if behind:
            # Transaction markers take offsets but are never delivered: trust the position.
            positions = self._consumer.position([TopicPartition(t, p) for t, p in behind])
            if any(tp.offset < targets[(tp.topic, tp.partition)] for tp in positions):
                return False
        self._finish()  # consumed is not projected until the batch in flight is written
        return True
