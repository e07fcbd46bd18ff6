"""The single writer of a SKU partition, without Faust: bytes in, records and table writes out.

The Faust agent (processors/app.py) is a thin shell around ``SkuWriter.handle``. Keeping this
free of Faust makes the hot path measurable and testable in-process.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from processors.decision import (
    Decision,
    IntentAccepted,
    IntentRejected,
    SaleRejected,
    SaleSettled,
    SaleTerms,
    SkuLedger,
    decide,
    ledger_from_decisions,
    settle_book,
)
from processors.records import command_from_record, from_record, terms_from_record, to_record
from producers.identity import decision_event_id
from schemas.codec import SchemaRegistry, UndecodableRecord

log = structlog.get_logger("processors.writer")

PRODUCER = "flashsale-inventory"
INPUT_RECORDS = frozenset({"SaleOpened", "SaleClosed", "SaleSettled", "PurchaseIntent"})
_SEP = "\x1f"
# A settled sale's digests are stored in chunks that stay well below Kafka's 1 MB record.
_DIGESTS_PER_CHUNK = 60_000
_HEADER = struct.Struct(">qi")  # sequence, remaining


def pack_settled(event: SaleSettled) -> list[bytes]:
    """Chunks to persist for a settled sale: header + sorted 8-byte digests."""
    digests = sorted(event.digests)
    chunks = [
        b"".join(d.to_bytes(8, "big") for d in digests[i : i + _DIGESTS_PER_CHUNK])
        for i in range(0, max(len(digests), 1), _DIGESTS_PER_CHUNK)
    ]
    chunks[0] = _HEADER.pack(event.sequence, event.remaining) + chunks[0]
    return chunks


def unpack_settled(chunks: list[bytes]) -> tuple[int, int, frozenset[int]]:
    """(sequence, remaining, digests) from the chunks written by ``pack_settled``."""
    sequence, remaining = _HEADER.unpack_from(chunks[0])
    blob = chunks[0][_HEADER.size :] + b"".join(chunks[1:])
    digests = frozenset(int.from_bytes(blob[i : i + 8], "big") for i in range(0, len(blob), 8))
    return sequence, remaining, digests


@dataclass(frozen=True)
class DeadLetter:
    """A record that cannot be processed, with the reason for the dead-letter topic."""

    reason: str
    detail: str


@dataclass
class Outcome:
    """What handling one input record produced."""

    decisions: list[tuple[str, bytes]] = field(default_factory=list)  # (sku key, value)
    # (table, key, value); a None value deletes the key.
    table_writes: list[tuple[str, str, bytes | None]] = field(default_factory=list)
    dead_letter: DeadLetter | None = None
    redelivered: int = 0  # decisions that were already known (duplicates / replays)


class SkuWriter:
    """Holds every assigned SKU's ledger in memory, rebuilt from the tables when stale.

    Persistence is one table entry per decided intent (the exact decision bytes) plus one
    per sale (terms) and per closed sale; the in-memory ledgers are derived from those.
    """

    DECISIONS = "decisions"
    SALES = "sales"

    def __init__(self, registry: SchemaRegistry) -> None:
        self._registry = registry
        self._ledgers: dict[str, SkuLedger] = {}
        self.stale = True

    # -- state ----------------------------------------------------------------------------
    def rebuild(
        self, decisions: Iterable[bytes], sales: Iterable[tuple[str, bytes]]
    ) -> dict[str, SkuLedger]:
        """Rebuild every ledger from the tables' contents (after start or a rebalance)."""
        terms: dict[str, list[SaleTerms]] = {}
        closed: dict[str, list[str]] = {}
        settled: dict[tuple[str, str], dict[int, bytes]] = {}
        for key, value in sales:
            parts = key.split(_SEP)
            if len(parts) == 3:  # sale_id, sku, "closed"
                closed.setdefault(parts[1], []).append(parts[0])
            elif len(parts) == 4:  # sale_id, sku, "settled", chunk number
                settled.setdefault((parts[0], parts[1]), {})[int(parts[3])] = value
            else:
                _, record = self._registry.decode(value)
                t = terms_from_record(record)
                terms.setdefault(t.sku, []).append(t)
        by_sku: dict[str, list[Decision]] = {}
        for value in decisions:
            name, record = self._registry.decode(value)
            d = from_record(name, record)
            by_sku.setdefault(d.sku, []).append(d)
        skus = set(terms) | set(by_sku)
        self._ledgers = {
            sku: ledger_from_decisions(
                sku, terms.get(sku, []), closed.get(sku, []), by_sku.get(sku, [])
            )
            for sku in skus
        }
        for (sale_id, sku), chunks in settled.items():
            sequence, remaining, digests = unpack_settled([chunks[i] for i in sorted(chunks)])
            settle_book(self.ledger(sku), sale_id, digests, sequence, remaining)
        self.stale = False
        log.info("writer.rebuilt", skus=len(skus), decisions=sum(map(len, by_sku.values())))
        return self._ledgers

    def ledger(self, sku: str) -> SkuLedger:
        """The ledger of one SKU (created empty on first use)."""
        ledger = self._ledgers.get(sku)
        if ledger is None:
            ledger = self._ledgers[sku] = SkuLedger(sku)
        return ledger

    # -- hot path -------------------------------------------------------------------------
    def handle(self, value: bytes | None, log_time_ms: int) -> Outcome:
        """Decode one input record, decide, and say what to emit and persist."""
        out = Outcome()
        if value is None:
            out.dead_letter = DeadLetter("empty-value", "record has no value")
            return out
        try:
            name, record = self._registry.decode(value)
        except UndecodableRecord as exc:
            out.dead_letter = DeadLetter(exc.reason, exc.message)
            return out
        if name not in INPUT_RECORDS:
            out.dead_letter = DeadLetter("wrong-schema", f"{name} does not belong on this topic")
            return out
        command = command_from_record(name, record)
        ledger = self.ledger(command.sku)
        before = ledger.sequence
        events = decide(ledger, command, log_time_ms)
        if name == "SaleOpened" and not events:
            out.table_writes.append((self.SALES, f"{record['sale_id']}{_SEP}{command.sku}", value))
        elif name == "SaleClosed":
            key = f"{record['sale_id']}{_SEP}{command.sku}{_SEP}closed"
            out.table_writes.append((self.SALES, key, b"1"))
        for event in events:
            if isinstance(event, IntentAccepted | IntentRejected):
                encoded = self.encode_decision(event)
                out.decisions.append((event.sku, encoded))
                # Re-written even when known: a write lost with an aborted transaction or a
                # killed worker is restored, and rewriting identical bytes is harmless.
                out.table_writes.append((self.DECISIONS, event.intent_id, encoded))
                if ledger.sequence == before:  # nothing new was decided: a repeat
                    out.redelivered += 1
            elif isinstance(event, SaleSettled):
                base = f"{event.sale_id}{_SEP}{event.sku}{_SEP}settled{_SEP}"
                for n, chunk in enumerate(pack_settled(event)):
                    out.table_writes.append((self.SALES, f"{base}{n}", chunk))
                out.table_writes += [(self.DECISIONS, i, None) for i in event.forgotten]
                log.info("sale.settled", sale_id=event.sale_id, sku=event.sku,
                         forgotten=len(event.forgotten))  # fmt: skip
            elif isinstance(event, SaleRejected):
                log.warning(
                    "sale.rejected", sale_id=event.sale_id, sku=event.sku, detail=event.detail
                )
        return out

    def encode_decision(self, event: Decision) -> bytes:
        """Deterministic bytes: the same decision always encodes identically."""
        record: dict[str, Any] = to_record(event)
        record["event_id"] = decision_event_id(event.intent_id)
        record["correlation_id"] = event.intent_id
        record["producer"] = PRODUCER
        record["occurred_at"] = event.decided_at
        return self._registry.encode(type(event).__name__, record)
