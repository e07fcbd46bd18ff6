"""Fakes for the writer's unit tests: a dict store, an input log, a state comparison."""

from __future__ import annotations

import bisect
import copy
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from processors.core import (
    AddUnits,
    CancelHold,
    CancelSale,
    CloseSale,
    Command,
    OpenSale,
    PauseSale,
    PlaceIntent,
    RecordPayment,
    ResumeSale,
    ReturnUnits,
    RevealDraw,
    SaleBook,
    SettleSale,
    SkuLedger,
    StartPayment,
    Tick,
    intent_digest,
)
from processors.writer import BatchResult, PartitionWriter, Replayed
from schemas.codec import SchemaRegistry

REGISTRY = SchemaRegistry.load_default()


class MemoryStore:
    """One partition's store as a dict: the ``StoreReader`` contract without RocksDB."""

    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self.data: dict[bytes, bytes] = dict(data or {})

    def get(self, key: bytes) -> bytes | None:
        """Value of ``key`` or None."""
        return self.data.get(key)

    def keys_from(self, prefix: bytes) -> Iterator[bytes]:
        """Keys starting with ``prefix``, sorted (a snapshot: callers may discard meanwhile)."""
        keys = sorted(self.data)
        start = bisect.bisect_left(keys, prefix)
        end = start
        while end < len(keys) and keys[end].startswith(prefix):
            end += 1
        return iter(keys[start:end])

    def discard(self, key: bytes) -> None:
        """Delete ``key`` locally."""
        self.data.pop(key, None)

    def apply(self, writes: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Apply a batch's writes as the table would (None deletes)."""
        for key, value in writes:
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def copy(self) -> MemoryStore:
        """An independent copy (the local disk as a crash would leave it)."""
        return MemoryStore(self.data)


def command_value(command: Command, n: int = 0) -> bytes:
    """``command`` as the input-topic record the edge or admin API would produce."""
    envelope = {"event_id": f"e{n}", "correlation_id": None, "producer": "t", "occurred_at": 0}
    if isinstance(command, PlaceIntent):
        body: dict[str, Any] = {"intent_id": command.intent_id, "idempotency_key": "k",
                                "user_id": command.user_id, "sale_id": command.sale_id,
                                "sku": command.sku, "quantity": command.quantity}  # fmt: skip
        return REGISTRY.encode("PurchaseIntent", {**envelope, **body})
    if isinstance(command, OpenSale):
        t = command.terms
        body = {"sale_id": t.sale_id, "sku": t.sku, "allocation": t.allocation,
                "per_user_limit": t.per_user_limit, "per_order_max": t.per_order_max,
                "starts_at": t.starts_at_ms, "ends_at": t.ends_at_ms,
                "rules_version": t.rules, "prequeue_opens_at": t.prequeue_opens_at_ms,
                "draw_commitment": t.draw_commitment,
                "progress_every": t.progress_every, "hold_ms": t.hold_ms,
                "pay_grace_ms": t.pay_grace_ms, "waitlist_depth": t.waitlist_depth}  # fmt: skip
        return REGISTRY.encode("OpenSale", {**envelope, **body})
    if isinstance(command, RevealDraw):
        body = {"sale_id": command.sale_id, "sku": command.sku, "seed": command.seed}
        return REGISTRY.encode("RevealDraw", {**envelope, **body})
    if isinstance(command, Tick):
        return REGISTRY.encode("ClockTick", {**envelope, "partition": 0})
    if isinstance(command, CloseSale):
        body = {"sale_id": command.sale_id, "sku": command.sku, "reason": "test"}
        return REGISTRY.encode("CloseSale", {**envelope, **body})
    if isinstance(command, SettleSale):
        body = {"sale_id": command.sale_id, "sku": command.sku}
        return REGISTRY.encode("SettleSale", {**envelope, **body})
    if isinstance(command, ReturnUnits):
        body = {"sale_id": command.sale_id, "sku": command.sku, "quantity": command.quantity,
                "ref": command.ref}  # fmt: skip
        return REGISTRY.encode("ReturnUnits", {**envelope, **body})
    if isinstance(command, StartPayment | RecordPayment | CancelHold | PauseSale | ResumeSale
                  | AddUnits | CancelSale):  # fmt: skip
        body = {f: getattr(command, f) for f in command.__slots__}  # type: ignore[union-attr]
        return REGISTRY.encode(type(command).__name__, {**envelope, **body})
    raise TypeError(f"no input record for {command!r}")


class InputLog:
    """An input partition: records at consecutive offsets from 0."""

    def __init__(self) -> None:
        self.records: list[Replayed] = []
        self._shown: list[str] = []  # for hypothesis' report of a failing example

    def __repr__(self) -> str:
        return "InputLog[\n  " + ",\n  ".join(self._shown) + "]"

    def add(self, command: Command, at: int) -> Replayed:
        """Append ``command`` with broker log time ``at``."""
        record = self.add_value(command_value(command, len(self.records)), at)
        self._shown[-1] = f"{record.offset} @{at}: {command!r}"
        return record

    def add_value(self, value: bytes | None, at: int, key: bytes | None = b"k") -> Replayed:
        """Append a raw record value."""
        record = Replayed(len(self.records), key, value, at)
        self.records.append(record)
        self._shown.append(f"{record.offset} @{at}: {value!r}")
        return record

    def between(self, first: int, end: int) -> list[Replayed]:
        """Records at offsets ``first`` .. ``end - 1``."""
        return self.records[first:end]


def log_of(timed: Iterable[tuple[int, Command]]) -> InputLog:
    """An input log holding ``timed`` (log time, command) in order."""
    log = InputLog()
    for at, command in timed:
        log.add(command, at)
    return log


def persist(
    writer: PartitionWriter,
    store: MemoryStore,
    batch: Sequence[Replayed],
    committed: int | None = None,
) -> BatchResult:
    """Handle one batch and apply its writes to ``store``."""
    result = writer.handle_batch(batch, committed)
    store.apply(result.writes)
    return result


def loaded(store: MemoryStore, first_offset: int) -> PartitionWriter:
    """A fresh writer loaded from ``store`` at ``first_offset``."""
    writer = PartitionWriter(REGISTRY, 0)
    writer.load(store, first_offset)
    return writer


def snapshot(ledgers: dict[str, SkuLedger]) -> dict[str, SkuLedger]:
    """A deep copy of live ledgers (whose settled digests are plain frozensets)."""
    return copy.deepcopy(ledgers)


def _without_digests(ledger: SkuLedger) -> SkuLedger:
    sales = {
        sale_id: dataclasses.replace(book, settled_digests=frozenset())
        for sale_id, book in ledger.sales.items()
    }
    return dataclasses.replace(ledger, sales=sales)


def _settled_digests_match(got: SaleBook, want: SaleBook) -> None:
    # A loaded book answers ``in`` from the store; the live one holds a frozenset.
    assert isinstance(want.settled_digests, frozenset)
    for digest in want.settled_digests:
        assert digest in got.settled_digests, (want.terms.sale_id, digest)
    for stranger in ("never-decided", "also-unknown"):
        digest = intent_digest(stranger)
        assert (digest in got.settled_digests) == (digest in want.settled_digests)


def assert_same_state(got: dict[str, SkuLedger], want: dict[str, SkuLedger]) -> None:
    """``got`` (e.g. loaded from a store) holds what ``want`` (live) knows.

    A ledger that never recorded anything equals no ledger; a settled sale's digests are
    compared by membership, as the writer only ever asks ``digest in``.
    """
    got = {sku: ledger for sku, ledger in got.items() if ledger != SkuLedger(sku)}
    want = {sku: ledger for sku, ledger in want.items() if ledger != SkuLedger(sku)}
    assert got.keys() == want.keys()
    for sku, ledger in want.items():
        assert _without_digests(got[sku]) == _without_digests(ledger), sku
        for sale_id, book in ledger.sales.items():
            if book.settled:
                _settled_digests_match(got[sku].sales[sale_id], book)
