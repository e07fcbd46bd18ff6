"""One live feed from the log: each app server reads the decisions topic itself.

A thread consumes every partition of the decisions topic (read_committed, ``assign``: no
consumer group, nothing committed) and hands each batch to the event loop, which keeps the
last ``window`` facts of each partition and fans them out to this server's subscribers: SSE
streams by user (``/v1/me/events``), streams by sale (``/v1/sales/{id}/events``) and callers
waiting for a sale's facts (the admin API's open).

**Event ids are log positions.** An event's id is a vector of offsets, one per partition
(``"o0.o1.o2..."``): every decision before offset ``o_p`` of partition ``p`` that belongs to
this user was sent on this stream. A client that reconnects with ``Last-Event-ID``, to this
server or to any other (nginx moves a user whose server died), gets exactly the events after
that vector from the server's window, then the live ones; nothing twice, nothing skipped. A
vector older than the window gets an ``event: reset`` (read ``GET /v1/intents/{id}`` for
what was missed). Heartbeats carry the current vector (an ``id:`` line without data: it moves
the client's last event id without an event), so an idle stream resumes cheaply.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import Any

import structlog
from confluent_kafka import KafkaError, TopicPartition

from flashsale.kafka_auth import Consumer
from processors.records import PROGRESS
from producers.http.catchup import watermarks
from producers.http.feedfacts import (
    DECISIONS,
    PER_INTENT,
    QUEUE_MAX,
    Accept,
    Fact,
    Kept,
    RawFact,
    SaleProgress,
    UserStream,
    _fact,
    format_position,
    parse_position,
)
from producers.http.statuses import ORDER_FACTS
from producers.http.waiting import WAITING, WaitingRoom
from schemas.codec import SchemaRegistry, UndecodableRecord

log = structlog.get_logger(__name__)

STALE_S = 5.0  # a reader thread silent this long is not trusted to say "undecided"


class DecisionFeed:
    """The decisions topic, read by this app server, fanned out on its event loop."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        registry: SchemaRegistry,
        window: int = 20_000,
        trust_s: float = 60.0,
    ) -> None:
        self.topic = topic
        self.window = window
        self.trust_ms = int(trust_s * 1000)
        self._registry = registry
        self._config = {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}.edge-feed-{uuid.uuid4().hex}",  # never joined: assign()
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # a partition read to its end is up to date
            "fetch.wait.max.ms": 50,
            "log_level": 3,
        }
        self.partitions = 0
        self._next: list[int] = []  # per partition: the next offset to be applied
        self._start: list[int] = []  # per partition: the window holds every fact from here
        self._facts: list[deque[Kept]] = []
        # Per partition: the latest intent log time the writer has decided, as read here
        # (-1: read from the log's start, nothing decided yet; None: not known yet) and the
        # offset to have read before trusting it (the end of the log when the feed started).
        self._reached: list[int | None] = []
        self._trust_from: list[int] = []
        self._eof: list[int] = []  # per partition: the offset it was last read to the end at
        # (-1: not read to its end once since the start)
        self._applied: asyncio.Future[None] | None = None  # resolved by the next batch applied
        self._heard = 0.0  # monotonic time of the reader thread's last consume
        self._users: dict[str, set[UserStream]] = defaultdict(set)
        self._waiters: dict[tuple[str, str], list[tuple[Accept, asyncio.Future[Fact]]]] = (
            defaultdict(list)
        )
        self._sales: dict[str, SaleProgress] = {}
        self._decided: dict[str, Kept] = {}  # the window's decisions by intent id
        # Intents answered 202 here and not decided yet: "n ahead of you" (producers.http.waiting)
        self.waiting = WaitingRoom()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Assign every partition, the last ``window`` records of each, and start reading."""
        self._loop = asyncio.get_running_loop()
        consumer = Consumer(self._config)
        try:
            while True:  # the server is not ready before Kafka answers
                try:
                    assignment = await asyncio.to_thread(self._assignment, consumer)
                    break
                except Exception as exc:  # KafkaException, or the topic is not there yet
                    log.warning("feed.waiting", topic=self.topic, error=str(exc))
                    await asyncio.sleep(1.0)
        except BaseException:  # cancelled (the server stops while waiting)
            consumer.close()
            raise
        offsets, lows, highs = assignment
        self.begin_at(offsets, lows, highs)
        consumer.assign([TopicPartition(self.topic, p, o) for p, o in enumerate(offsets)])
        self._thread = threading.Thread(
            target=self._read, args=(consumer,), daemon=True, name="decision-feed"
        )
        self._thread.start()

    def begin_at(
        self, offsets: list[int], lows: list[int] | None = None, highs: list[int] | None = None
    ) -> None:
        """Start the window at these offsets, one per partition (on the loop); ``lows`` and
        ``highs`` are the log's start and end offsets when the feed started."""
        self._loop = asyncio.get_running_loop()
        self.partitions = len(offsets)
        self._start = list(offsets)
        self._next = list(offsets)
        self._facts = [deque() for _ in offsets]
        lows = lows or [-1] * len(offsets)
        self._reached = [-1 if o <= low else None for o, low in zip(offsets, lows, strict=True)]
        self._trust_from = list(highs or offsets)
        self._eof = [-1] * len(offsets)
        self._heard = time.monotonic()

    def apply(self, batch: Iterable[RawFact]) -> None:
        """Apply facts read from the log, in log order per partition (on the loop)."""
        self._apply([tuple(f) for f in batch])  # type: ignore[misc]

    def _assignment(self, consumer: Consumer) -> tuple[list[int], list[int], list[int]]:
        """Per partition: where the window starts, the log's start and its end."""
        try:
            _, marks = watermarks(consumer, self.topic, None, 10)
        except LookupError as missing:
            raise RuntimeError(f"{missing}: provision the topics first") from None
        offsets = [max(low, high - self.window) for low, high in marks]
        return offsets, [low for low, _ in marks], [high for _, high in marks]

    async def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
            self._thread = None

    def _read(self, consumer: Consumer) -> None:
        """The reader thread: consume, decode, hand batches to the loop."""
        loop = self._loop
        assert loop is not None
        try:
            while not self._stopping.is_set():
                messages = consumer.consume(1000, 0.1)
                self._heard = time.monotonic()
                batch = []
                ends: list[tuple[int, int]] = []
                for m in messages:
                    if (error := m.error()) is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            ends.append((m.partition() or 0, m.offset() or 0))
                        else:
                            log.warning("feed.consume_error", error=str(error))
                        continue
                    try:
                        name, record = self._registry.decode(m.value() or b"")
                    except UndecodableRecord:
                        name, record = "", {}  # its position still counts
                    if name == PROGRESS:  # when the writer wrote it: its pace, for eta_s
                        record["written_at"] = m.timestamp()[1]
                    batch.append((m.partition() or 0, m.offset() or 0, name, record))
                if batch or ends:
                    try:
                        loop.call_soon_threadsafe(self._apply, batch, ends)
                    except RuntimeError:  # the loop is closed
                        return
        finally:
            consumer.close()

    # -- on the loop ---------------------------------------------------------------------------
    def _apply(self, batch: list[RawFact], ends: Iterable[tuple[int, int]] = ()) -> None:
        for raw in batch:
            try:
                self._apply_one(raw)
            except (KeyError, TypeError) as exc:  # a decodable record without a field we read
                log.warning("feed.bad_fact", partition=raw[0], offset=raw[1], name=raw[2],
                            intent_id=raw[3].get("intent_id"), error=repr(exc))  # fmt: skip
                self._next[raw[0]] = raw[1] + 1
        for p, offset in ends:  # read to the end (after this batch's facts)
            self._eof[p] = max(self._eof[p], offset)
        applied, self._applied = self._applied, None
        if applied is not None and not applied.done():
            applied.set_result(None)

    def next_apply(self) -> asyncio.Future[None]:
        """Resolved once the next batch read from the log has been applied here (one future
        shared by every caller: await it shielded)."""
        if self._applied is None:
            assert self._loop is not None, "the feed is not started"
            self._applied = self._loop.create_future()
        return self._applied

    def read_to(self, ends: list[int]) -> bool:
        """Whether every fact below ``ends`` (an offset per partition) has been applied here;
        a committed end is read when the feed hit the end there (it moves past transaction
        markers, which are never applied)."""
        return len(ends) == self.partitions and all(
            self._next[p] >= end or self._eof[p] >= end for p, end in enumerate(ends)
        )

    def _apply_one(self, raw: RawFact) -> None:
        p, offset, name, record = raw
        facts = self._facts[p]
        if len(facts) >= self.window:
            old = facts.popleft()
            self._start[p] = old[1] + 1
            if old[5] is not None and self._decided.get(old[5]) is old:
                del self._decided[old[5]]  # (not its decision, kept after its queueing)
        own = name in PER_INTENT
        owner = record["user_id"] if own else self._owner(name, record)
        kept: Kept = (p, offset, name, tuple(record.items()), owner,
                      record["intent_id"] if own else None)  # fmt: skip
        facts.append(kept)
        self._next[p] = offset + 1
        self.applied += 1
        if own:
            self._decided[record["intent_id"]] = kept
            self.waiting.resolved(record["intent_id"])
            if name in DECISIONS:
                reached = self._reached[p]
                if reached is None or record["decided_at"] > reached:
                    self._reached[p] = record["decided_at"]
            self._progress(name, record)
            streams = self._users.get(record["user_id"])
            if streams:
                self._push(streams, Fact(*raw))
        elif "sku" in record and "sale_id" in record:
            if owner is not None:  # an order's transition: its owner hears it
                streams = self._users.get(owner)
                if streams:
                    self._push(streams, Fact(*raw))
            if name == PROGRESS:
                for user_id, status in self.waiting.progress(record):
                    streams = self._users.get(user_id)
                    if streams:
                        self._tell(streams, Fact(p, offset, WAITING, status))
            self._progress(name, record)
            key = (record["sale_id"], record["sku"])
            waiting = self._waiters.get(key)
            if waiting:
                self._resolve(key, waiting, Fact(*raw))

    def _owner(self, name: str, record: dict[str, Any]) -> str | None:
        """The user an order's fact belongs to: named in it, or the owner of the accepted
        intent behind its order (``ord-<intent id>``) while that is in the window."""
        if name not in ORDER_FACTS:
            return None
        user: str | None = record.get("user_id")
        if user is None:
            kept = self._decided.get(record["order_id"].removeprefix("ord-"))
            user = None if kept is None else kept[4]
        return user

    def _resolve(
        self, key: tuple[str, str], waiting: list[tuple[Accept, asyncio.Future[Fact]]], fact: Fact
    ) -> None:
        keep = []
        for accept, fut in waiting:
            if fut.done():
                continue
            if accept(fact):
                fut.set_result(fact)
            else:
                keep.append((accept, fut))
        if keep:
            self._waiters[key] = keep
        else:
            del self._waiters[key]

    def _push(self, streams: set[UserStream], fact: Fact) -> None:
        p = fact.partition
        for stream in list(streams):
            if fact.offset < stream.floor[p]:
                continue  # sent before this stream resumed here
            stream.floor[p] = fact.offset + 1
            position = self.position_for(stream)
            if stream.queue.qsize() >= QUEUE_MAX - 1:
                _end(stream)  # a stalled client: it resumes from the last event it received
                self.unsubscribe(stream)
                continue
            stream.queue.put_nowait((position, fact))

    def _tell(self, streams: set[UserStream], fact: Fact) -> None:
        """Push a status that is not one of the user's log facts (its position stays)."""
        for stream in list(streams):
            if stream.queue.qsize() >= QUEUE_MAX - 1:
                continue  # a stalled client: the next status or its decision will do
            stream.queue.put_nowait((self.position_for(stream), fact))

    def _progress(self, name: str, r: dict[str, Any]) -> None:
        progress = self._sales.get(r["sale_id"])
        if progress is None:
            if len(self._sales) > 10_000:
                self._sales.clear()
            progress = self._sales[r["sale_id"]] = SaleProgress()
        if name == "UnitsReturned" or name == "UnitsAdded":
            self.waiting.returned(r["sale_id"], r["sku"])
        elif name == "SaleOpened":
            progress.opened.add(r["sku"])
        if "remaining" in r:
            progress.remaining[r["sku"]] = r["remaining"]
        elif name == "SaleOpened":
            progress.remaining[r["sku"]] = r["allocation"]
        elif name == "EntryQueued":
            progress.entrants[r["sku"]] = r["entrants"]
        else:
            return
        progress.version += 1

    # -- subscribers ----------------------------------------------------------------------------
    def position_for(self, stream: UserStream) -> str:
        """What a stream has delivered through: the feed's position, or the stream's where
        it resumed ahead of this server."""
        return format_position(max(a, b) for a, b in zip(self._next, stream.floor, strict=True))

    def subscribe(self, user_id: str, last_event_id: str | None) -> tuple[UserStream, bool]:
        """A stream for ``user_id``, resumed after ``last_event_id`` when it is in the window.

        Returns the stream (with the missed events already queued) and whether its position
        was older than the window (the caller sends ``reset``).
        """
        resume = parse_position(last_event_id, self.partitions)
        gap = bool(last_event_id) and (
            resume is None or any(r < s for r, s in zip(resume, self._start, strict=True))
        )
        if resume is None or gap:
            stream = UserStream(user_id, list(self._next))
        else:
            stream = UserStream(user_id, list(resume))
            missed = (
                (p, fact)
                for p, facts in enumerate(self._facts)
                for kept in facts
                if kept[1] >= resume[p]
                and kept[4] == user_id  # an intent's fact, or an order's of theirs
                and (fact := _fact(kept))
            )
            for p, fact in missed:
                if stream.queue.qsize() >= QUEUE_MAX - 1:
                    _end(stream)  # more than a queue's worth: the client resumes for the rest
                    return stream, gap
                stream.floor[p] = fact.offset + 1
                stream.queue.put_nowait((format_position(stream.floor), fact))
        self._users[user_id].add(stream)
        return stream, gap

    def unsubscribe(self, stream: UserStream) -> None:
        streams = self._users.get(stream.user_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._users[stream.user_id]

    @property
    def subscribers(self) -> int:
        return sum(len(s) for s in self._users.values())

    def decision(self, intent_id: str) -> Fact | None:
        """The intent's decision if it is in this server's window (often before the
        projection has it), or its ``EntryQueued`` while it waits in a pre-queue."""
        kept = self._decided.get(intent_id)
        return None if kept is None else _fact(kept)

    def undecided(self, partition: int, log_time_ms: int) -> bool:
        """True when the writer of ``partition`` surely has not decided an intent the log
        stamped ``log_time_ms``: this feed has read every decision the partition had when it
        started, and the writer, which decides in log order, has decided nothing from that
        millisecond on. False when unsure (the caller asks the projection): a partition not
        read far enough, or an intent older than ``trust_s`` (a feed cut off from the broker
        must not say ``queued`` for ever), or a reader thread that has not consumed for
        ``STALE_S`` (dead or stuck)."""
        if not 0 <= partition < self.partitions or time.monotonic() - self._heard > STALE_S:
            return False
        if self._eof[partition] < 0 and self._next[partition] < self._trust_from[partition]:
            return False
        reached = self._reached[partition]
        return (
            reached is not None
            and reached < log_time_ms
            and time.time() * 1000 - log_time_ms <= self.trust_ms
        )

    def placed(
        self, user_id: str, intent_id: str, sale_id: str, sku: str, quantity: int, at: Any
    ) -> None:
        """An intent answered 202 at ``at`` (its ``Appended`` place in the input log): its
        owner is told how far ahead of it the writer is until its decision is read."""
        if intent_id not in self._decided:
            self.waiting.register(user_id, intent_id, sale_id, sku, quantity, at.partition,
                                  at.offset)  # fmt: skip

    def knows(self, sale_id: str, sku: str) -> bool:
        """Whether this server has read a fact of (sale, SKU) (e.g. its SaleOpened)."""
        progress = self._sales.get(sale_id)
        return progress is not None and sku in progress.remaining

    def sale_progress(self, sale_id: str) -> SaleProgress | None:
        return self._sales.get(sale_id)

    def expect(self, sale_id: str, sku: str, accept: Accept) -> asyncio.Future[Fact]:
        """A future for the next fact of (sale, SKU) that is not a decision (SaleOpened,
        SaleRefused, SaleClosed, ...) and that ``accept`` takes; register it before writing
        the command it answers."""
        assert self._loop is not None
        fut: asyncio.Future[Fact] = self._loop.create_future()
        self._waiters[(sale_id, sku)].append((accept, fut))
        return fut

    def forget(self, sale_id: str, sku: str, fut: asyncio.Future[Fact]) -> None:
        waiting = self._waiters.get((sale_id, sku))
        if waiting:
            waiting[:] = [(a, f) for a, f in waiting if f is not fut]
            if not waiting:
                del self._waiters[(sale_id, sku)]


def _end(stream: UserStream) -> None:
    """End a stream after what is queued: every queued event was really sent when the client
    reads the end, so its last event id is exact (nothing queued is dropped)."""
    stream.queue.put_nowait(None)
