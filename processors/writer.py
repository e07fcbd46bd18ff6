"""The single writer of one input partition, without Faust: batches in, records and state out.

The Faust agent (processors/app.py) is a thin shell around ``PartitionWriter.handle_batch``.
Keeping this free of Faust makes the hot path measurable and testable in-process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from flashsale import intent_sig
from processors import state_layout as layout
from processors.core import (
    Command,
    Decision,
    Event,
    IntentAccepted,
    IntentRejected,
    PlaceIntent,
    QueueProgress,
    SaleOpened,
    SaleRefused,
    SaleSettled,
    SkuLedger,
    Tick,
    decide,
    evolve,
    progress_due,
)
from processors.hot_codec import DecisionEncoder
from processors.records import (
    COMMAND_RECORDS,
    PROGRESS,
    command_from_record,
    record_name,
    to_record,
)
from processors.writer_delta import Touched
from producers.identity import fact_event_id, progress_event_id
from schemas.codec import SchemaRegistry, UndecodableRecord

log = structlog.get_logger("processors.writer")

PRODUCER = "flashsale-inventory"
# A checkpoint replaces the deltas once this many were written since the last one.
CHECKPOINT_EVERY = 2_000


class InputRecord(Protocol):
    """What the writer needs of a consumed record (aiokafka's ConsumerRecord has these)."""

    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int:
        """Broker log-append time, epoch ms."""
        ...


@dataclass(frozen=True)
class Replayed:
    """An input record re-read for a rebuild (same attributes as ``InputRecord``)."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: Any = None  # as the consumer gives them


@dataclass(frozen=True)
class DeadLetter:
    """A record that cannot be processed, with the reason for the dead-letter topic."""

    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    detail: str
    intent_id: str | None = None  # a decoded intent's (an unsigned or forged one): traceable


@dataclass
class BatchResult:
    """What handling one batch produced, in input order."""

    # Every event (decisions and sale facts) as (SKU key, value), for the decisions topic.
    events: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    writes: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # None deletes
    repeats: int = 0  # intents already decided earlier in the log: no second decision
    checkpoint: bool = False
    touched: Touched | None = None


class StateMissing(RuntimeError):
    """The store lacks state for records the group already committed: rebuild by replay."""


class PartitionWriter:
    """Every SKU ledger of one input partition, loaded from and persisted to its store."""

    def __init__(
        self, registry: SchemaRegistry, partition: int, intent_key: bytes | None = None
    ) -> None:
        """``intent_key``: accept only intents the edge signed with it (``intent_sig``)."""
        self._registry = registry
        self._intent_key = intent_key
        self._encoder = DecisionEncoder(registry, PRODUCER)
        self.partition = partition
        self.ledgers: dict[str, SkuLedger] = {}
        self._checkpoint_at: int | None = None  # offset of the latest checkpoint written
        self._deltas_since = 0
        # Keys the state currently rests on (latest checkpoint + deltas since), and keys
        # superseded by a checkpoint, deletable once that checkpoint's offset is committed.
        self._live: list[bytes] = []
        self._garbage: list[tuple[int, list[bytes]]] = []
        self._force_checkpoint = False
        self._has_layout = False
        # Sales settled while replaying for a rebuild: their digests go out with the
        # checkpoint that follows it (a rebuild emits nothing itself).
        self._replayed_settlements: list[tuple[SaleSettled, int]] = []
        self.position = -1  # offset of the record being decided (named when a crash hits)
        self._last_write: int | None = None  # the last batch that wrote a delta or checkpoint

    # -- loading ----------------------------------------------------------------------
    def load(self, store: layout.StoreReader, first_offset: int) -> dict[str, int]:
        """Fold the committed state; discard what transactions at/after ``first_offset`` left.

        ``first_offset`` is where consumption resumes, i.e. the committed input position.
        Raises StateMissing when records before it were committed but the store has no state.
        """
        stale: list[bytes] = []
        checkpoints: list[bytes] = []
        for key in store.keys_from(b"C/"):
            (stale if layout.key_offset(key) >= first_offset else checkpoints).append(key)
        base = max((layout.key_offset(k) for k in checkpoints), default=None)
        ledgers: dict[str, SkuLedger] = {}
        garbage = [k for k in checkpoints if layout.key_offset(k) != base]
        folded = 0
        live: list[bytes] = [layout.offset_key(b"C", base)] if base is not None else []
        chunks: dict[tuple[bytes, int], int] = {}  # (kind, offset) -> chunks seen
        links: dict[int, tuple[int | None, int]] = {}
        unreadable: str | None = None
        for kind in (b"S/", b"D/"):
            for key in store.keys_from(kind):
                offset = layout.key_offset(key)
                if offset >= first_offset:
                    stale.append(key)
                elif base is not None and (offset < base or (kind == b"S/" and offset != base)):
                    garbage.append(key)
                else:
                    value = store.get(key)
                    if value is None:
                        continue
                    live.append(key)
                    if key.endswith(layout.LINK_SUFFIX):
                        links[offset] = layout.decode_link(value)
                        continue
                    try:
                        layout.fold(ledgers, value)
                    except Exception as exc:  # an op for a book whose terms are missing, ...
                        unreadable = unreadable or f"{key!r} does not fold: {exc!r}"
                    chunks[kind, offset] = chunks.get((kind, offset), 0) + 1
                    folded += 1
        broken = unreadable or (
            self._broken_chain(store, base, chunks, links) if first_offset > 0 else None
        )
        # The marker has no offset, so a batch that never committed may have left it; the
        # batch writing it also writes a checkpoint (close_batch), so only a marker with a
        # committed checkpoint is proof of state.
        has_layout = store.get(layout.LAYOUT_KEY) == layout.LAYOUT and base is not None
        settled = self._attach_settled(store, ledgers, first_offset, stale)
        # Discarded even when state is missing: a rebuild must not fold them in later.
        for key in stale:
            store.discard(key)
        if broken is not None and has_layout:
            raise StateMissing(f"partition {self.partition}: state incomplete ({broken})")
        if first_offset > 0 and not has_layout:
            raise StateMissing(
                f"partition {self.partition}: input committed up to offset {first_offset} "
                "but the store holds no state in layout "
                f"{layout.LAYOUT.decode()} (new disk, lost changelog or an older layout)"
            )
        self.ledgers = ledgers
        self._checkpoint_at = base
        self._last_write = max(links, default=base)
        self._live = live
        self._deltas_since = len(links)
        self._garbage = [(base, garbage)] if garbage and base is not None else []
        self._has_layout = has_layout
        return {"chunks_folded": folded, "discarded": len(stale), "settled_sales": settled,
                "skus": len(ledgers)}  # fmt: skip

    @staticmethod
    def _broken_chain(
        store: layout.StoreReader,
        base: int | None,
        chunks: dict[tuple[bytes, int], int],
        links: dict[int, tuple[int | None, int]],
    ) -> str | None:
        """Why the folded state is not complete (a chunk or a delta missing), or None."""
        if base is None:
            return "no committed checkpoint"
        want = store.get(layout.offset_key(b"C", base))
        if want is None or chunks.get((b"S/", base), 0) != int(want):
            return f"checkpoint {base} has {chunks.get((b'S/', base), 0)} of {want!r} chunks"
        previous: int | None = base
        deltas = sorted(o for kind, o in chunks if kind == b"D/")
        if sorted(links) != deltas:
            return f"deltas {deltas} but links {sorted(links)}"
        for offset in deltas:
            prev, n = links[offset]
            if prev != previous or n != chunks[b"D/", offset]:
                return f"delta {offset} follows {prev} with {n} chunks, expected {previous}"
            previous = offset
        return None

    def _attach_settled(
        self,
        store: layout.StoreReader,
        ledgers: dict[str, SkuLedger],
        first_offset: int,
        stale: list[bytes],
    ) -> int:
        n = 0
        for key in store.keys_from(b"Z/"):
            if not key.endswith(b"/h"):
                continue
            value = store.get(key)
            if value is None:
                continue
            offset, chunks = layout.decode_header(value)
            prefix = key[:-1]
            if offset >= first_offset:
                stale.append(key)  # its chunks are rewritten identically when redone
                continue
            sku, sale_id = key[2:-2].decode().split("\x1f", 1)
            book = ledgers.get(sku, SkuLedger(sku)).sales.get(sale_id)
            if book is not None and book.settled:
                book.settled_digests = layout.SettledDigests(store, prefix, chunks)
                n += 1
        return n

    def rebuild(self, records: Iterable[InputRecord]) -> int:
        """Decide ``records`` (input offsets 0..committed) again without emitting anything."""
        self.ledgers = {}
        self._replayed_settlements = []
        n = 0
        for record in records:
            self._decide_one(record, None, None)
            n += 1
        self._force_checkpoint = True
        self._checkpoint_at, self._garbage, self._live = None, [], []
        return n

    # -- hot path ---------------------------------------------------------------------
    def handle_batch(self, records: Sequence[InputRecord], committed: int | None) -> BatchResult:
        """Decide a whole batch and persist it (``open_batch`` + ``decide`` + ``close_batch``)."""
        batch = self.open_batch()
        self.decide(batch, records)
        self.close_batch(batch, records[0].offset, committed)
        return batch

    def open_batch(self) -> BatchResult:
        """Start a batch; feed it with ``decide`` in chunks, then ``close_batch``."""
        out = BatchResult()
        out.touched = Touched()
        return out

    def decide(self, batch: BatchResult, records: Iterable[InputRecord]) -> None:
        """Decide records in log order, appending decisions and dead letters to ``batch``."""
        touched = batch.touched
        for record in records:
            self._decide_one(record, batch, touched)

    def close_batch(self, batch: BatchResult, first: int, committed: int | None) -> None:
        """Append the state writes persisting the batch that started at input offset ``first``.

        ``committed`` is the input offset the group last committed (for garbage collection).
        """
        touched = batch.touched
        if touched is None:
            raise ValueError("close_batch of a batch not opened with open_batch")
        if not self._has_layout:
            batch.writes.append((layout.LAYOUT_KEY, layout.LAYOUT))
            self._has_layout = True
            self._force_checkpoint = True  # the marker counts only with a checkpoint (load)
        checkpoint = (
            self._force_checkpoint or touched.settled or (self._deltas_since >= CHECKPOINT_EVERY)
        )
        if checkpoint:
            self._write_checkpoint(first, committed, batch)
        elif touched.skus:
            chunks = layout.chunk_ops(touched.ops(self.ledgers))
            for n, chunk in enumerate(chunks):
                key = layout.offset_key(b"D", first, n)
                batch.writes.append((key, chunk))
                self._live.append(key)
            # The link names the state-writing batch before this one: load follows the chain
            # from the checkpoint and refuses a store with a delta missing or incomplete.
            link = layout.offset_key(b"D", first) + layout.LINK_SUFFIX
            batch.writes.append((link, layout.encode_link(self._last_write, len(chunks))))
            self._live.append(link)
            self._deltas_since += 1
            self._last_write = first

    def _write_checkpoint(self, first: int, committed: int | None, out: BatchResult) -> None:
        ops: list[list[Any]] = []
        for ledger in self.ledgers.values():
            ops += layout.ledger_ops(ledger)
        chunks = layout.chunk_ops(ops)
        written = [(layout.offset_key(b"S", first, n), c) for n, c in enumerate(chunks)]
        written.append((layout.offset_key(b"C", first), b"%d" % len(chunks)))
        out.writes += written
        for event, offset in self._replayed_settlements:
            self._settle(event, offset, out)
        self._replayed_settlements = []
        # What a checkpoint supersedes may be deleted once that checkpoint's transaction is
        # committed (its offset is below the committed input offset); until then a crash
        # falls back to the older checkpoint and the deltas after it.
        if self._live:
            self._garbage.append((first, self._live))
        self._live = [k for k, _ in written]
        keep: list[tuple[int, list[bytes]]] = []
        for valid_after, keys in self._garbage:
            if committed is not None and valid_after < committed:
                out.writes += [(k, None) for k in keys]
            else:
                keep.append((valid_after, keys))
        self._garbage = keep
        self._force_checkpoint = False
        self._deltas_since = 0
        out.checkpoint = True
        self._checkpoint_at = self._last_write = first

    def _command(self, record: InputRecord, out: BatchResult | None) -> Command | None:
        """The record's command, or None after dead-lettering it (when ``out`` is given)."""
        value = record.value
        reason, detail = "empty-value", "record has no value"
        intent_id = None
        if value is not None:
            try:
                name, rec = self._registry.decode(value)
            except UndecodableRecord as exc:
                reason, detail = exc.reason, exc.message
            else:
                if name in COMMAND_RECORDS:
                    bad = None
                    if name == "PurchaseIntent" and self._intent_key is not None:
                        # the same verdict live and in a replay: aiokafka's records and
                        # Replayed both carry their headers
                        bad = intent_sig.problem(value, getattr(record, "headers", None),
                                                 self._intent_key)  # fmt: skip
                    if bad is None:
                        return command_from_record(name, rec)
                    reason, detail = bad
                    intent_id = rec.get("intent_id")
                else:
                    reason, detail = "wrong-schema", f"{name} does not belong on this topic"
        if out is not None:
            out.dead_letters.append(
                DeadLetter(record.offset, record.key, value, reason, detail, intent_id)
            )
        return None

    def _decide_one(
        self, record: InputRecord, out: BatchResult | None, touched: Touched | None
    ) -> None:
        self.position = record.offset
        command = self._command(record, out)
        if command is None:
            return
        if type(command) is Tick:  # the sale clock's: every ledger of the partition sees it
            for sku in sorted(self.ledgers):  # one order, whatever order the state loaded in
                self._apply(self.ledgers[sku], Tick(sku), record, out, touched)
            return
        sku = command.sku
        ledger = self.ledgers.get(sku)
        if ledger is None:
            ledger = self.ledgers[sku] = SkuLedger(sku)
        self._apply(ledger, command, record, out, touched)

    def _apply(
        self,
        ledger: SkuLedger,
        command: Command,
        record: InputRecord,
        out: BatchResult | None,
        touched: Touched | None,
    ) -> None:
        sku = ledger.sku
        events = decide(ledger, command, record.timestamp)
        progress: dict[int, QueueProgress] = {}  # after the event at this index
        sales = ledger.sales
        for i, event in enumerate(events):
            book = sales.get(event.sale_id)
            before = 0 if book is None else book.remaining
            evolve(ledger, event)
            book = book or sales.get(event.sale_id)
            if (
                book is not None
                and book.terms.progress_every
                and progress_due(book.terms.progress_every, event.sequence, before, book.remaining)
            ):
                progress[i] = QueueProgress(event.sale_id, sku, event.sequence, book.remaining,
                                            before > 0 >= book.remaining, self.partition,
                                            record.offset, record.timestamp)  # fmt: skip
        if touched is None or out is None:
            self._replayed_settlements += [
                (e, record.offset) for e in events if type(e) is SaleSettled
            ]
            return
        if not events:
            if type(command) is PlaceIntent:
                out.repeats += 1
            return
        key = sku.encode()
        for i, event in enumerate(events):
            if type(event) is IntentAccepted or type(event) is IntentRejected:
                out.events.append((key, self._encoder.encode(event)))
                touched.decided(sku, event, event.sale_id in ledger.sales)
                if progress and i in progress:
                    out.events.append((key, self.encode_progress(progress[i])))
                continue
            out.events.append((key, self.encode_fact(event)))
            if type(event) is SaleSettled:
                self._settle(event, record.offset, out)
                touched.settled = True
            elif event.sale_id not in ledger.sales:  # a refused OpenSale of no book
                touched.orphan_sales.setdefault(sku, set()).add(event.sale_id)
                touched.skus.add(sku)
            else:
                change = touched.book(sku, event.sale_id, new=type(event) is SaleOpened)
                touched.fact(change, event)
            if type(event) is SaleRefused:
                log.warning("sale.refused", sale_id=event.sale_id, sku=sku,
                            command=event.command, detail=event.detail)  # fmt: skip
            if progress and i in progress:
                out.events.append((key, self.encode_progress(progress[i])))

    def _settle(self, event: SaleSettled, offset: int, out: BatchResult) -> None:
        book = self.ledgers[event.sku].sales[event.sale_id]
        prefix = layout.settled_prefix(event.sku, event.sale_id)
        chunks = layout.pack_digests(book.settled_digests)  # type: ignore[arg-type]
        out.writes += [(prefix + b"%04d" % n, c) for n, c in enumerate(chunks)]
        out.writes.append((prefix + b"h", layout.encode_header(offset, len(chunks))))
        log.info("sale.settled", sale_id=event.sale_id, sku=event.sku, forgotten=event.intents)

    def encode_fact(self, event: Event) -> bytes:
        """A sale fact with its envelope; deterministic like a decision (id from its sequence)."""
        envelope = {"event_id": fact_event_id(event.sale_id, event.sku, event.sequence),
                    "correlation_id": getattr(event, "intent_id", None), "producer": PRODUCER,
                    "occurred_at": event.decided_at}  # fmt: skip
        return self._registry.encode(record_name(event), {**envelope, **to_record(event)})

    def encode_progress(self, fact: QueueProgress) -> bytes:
        """A progress fact with its envelope, deterministic (id from the event it follows)."""
        envelope = {"event_id": progress_event_id(fact.sale_id, fact.sku, fact.after_sequence),
                    "correlation_id": None, "producer": PRODUCER,
                    "occurred_at": fact.decided_at}  # fmt: skip
        return self._registry.encode(PROGRESS, {**envelope, **to_record(fact)})

    def encode_decision(self, event: Decision) -> bytes:
        """Deterministic bytes: the same decision always encodes identically."""
        return self._encoder.encode(event)
