"""Placing an intent: the service behind ``POST /v1/sales/{sale_id}/intents``.

No PostgreSQL write on this path. The intent is produced (acks=all) and answered from memory:

- **Retries.** nginx pins each user to one app server, so a bounded per-process table of
  recent intents (by user, sale and ``Idempotency-Key``) answers a retry with the same intent
  without producing again, and refuses a different body under a used key
  (``idempotency_conflict``). A retry while the first attempt is still waiting for its ack
  waits for that same ack.
- **Beyond the table** (an evicted entry, a server that died, a user moved by a rebalance of
  the upstream hash): a retry with the same SKU derives the same intent id, so it reaches the
  same writer, which decides the first copy and ignores the others (counted as repeats). A
  retry with another SKU under the same key is another intent (the SKU is part of the id):
  one intent id never has two writers. A retry refused by the sale's state (sold out by now)
  is answered with the same 202 when the projection already holds its intent.
- **Receipts.** The 202's ``status_url`` carries an HMAC over the intent's fields and where
  the log put it (partition, broker append time), so ``GET /v1/intents/{id}`` answers
  ``queued`` for it, on any app server, until its decision is known; while the live feed
  shows the writer has not reached that append time, without asking PostgreSQL (see
  ``Receipts`` and ``producers.http.views``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import structlog
from confluent_kafka import KafkaException

from producers.commands import Appended, NotAcknowledged
from producers.http.rules import Refused, SkuTerms, check_intent
from producers.identity import intent_id_for

log = structlog.get_logger(__name__)


class _Sparse:
    """One log line per ``every_s`` for one event, counting the lines left out: an outage
    fails every request, and the log must not flood (each line still names its intent)."""

    def __init__(self, event: str, every_s: float = 1.0) -> None:
        self.event, self.every_s = event, every_s
        self.next_at, self.left_out = 0.0, 0

    def warn(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return
        log.warning(self.event, left_out=self.left_out, **fields)
        self.next_at, self.left_out = now + self.every_s, 0


_unacknowledged = _Sparse("intent.not_acknowledged")

T = TypeVar("T")


class Unacknowledged(Exception):
    """Kafka did not acknowledge the intent in time: its outcome is unknown (retry, same key)."""


class IntentLog(Protocol):
    """Where intents are written: resolves once the log acknowledged the intent (acks=all)."""

    def submit_intent_async(
        self, sale_id: str, sku: str, user_id: str, quantity: int, idempotency_key: str
    ) -> tuple[str, asyncio.Future[Appended]]: ...


class SaleReader(Protocol):
    """What the service reads: a sale's terms (briefly cached) and a projected intent."""

    async def sale(self, sale_id: str) -> Mapping[str, SkuTerms]: ...

    async def projected_intent(self, intent_id: str) -> tuple[str, str, int] | None:
        """(user_id, sku, quantity) of an intent the projection holds, else None."""
        ...


@dataclass(frozen=True, slots=True)
class Placed:
    """A placed intent: in the log, to be decided once."""

    intent_id: str
    sale_id: str
    sku: str
    quantity: int
    receipt: str
    # Seconds from handing the record to the producer to Kafka's ack; None when nothing was
    # written (a retry answered from memory or from the projection: a repeat).
    ack_s: float | None = None

    @property
    def status_url(self) -> str:
        # Identifiers are [A-Za-z0-9_.:-] (validated), all safe in a query string.
        return (
            f"/v1/intents/{self.intent_id}?sale_id={self.sale_id}&sku={self.sku}"
            f"&quantity={self.quantity}&receipt={self.receipt}"
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a valid receipt proves besides the intent's fields: where the log put the intent
    (None for a receipt signed without it, e.g. a retry answered from the projection)."""

    partition: int | None = None
    log_time_ms: int | None = None
    offset: int | None = None  # where in the partition (receipts signed before had none)


class Receipts:
    """Receipts: proof that this edge acknowledged an intent with exactly these fields.

    A 16-byte keyed BLAKE2b MAC (RFC 7693's keyed mode: ~1 µs where HMAC-SHA256 took 5-6)
    with a key derived from the edge's signing secret, so every app server checks what any
    other signed; base64url (22 characters), then
    ``.<partition>.<log append time in ms>.<offset>`` when the log's place is known (covered by
    the MAC too; receipts signed before the offset was added lack it). A plain 22-character receipt
    signed by an earlier version (HMAC-SHA256) is still accepted.
    """

    def __init__(self, secret: str) -> None:
        self._legacy = hmac.new(secret.encode(), b"flashsale intent receipts v1", "sha256").digest()
        self._key = hashlib.blake2b(
            secret.encode(), digest_size=32, person=b"fs-receipts-v2"
        ).digest()

    def _mac(self, fields: str) -> str:
        mac = hashlib.blake2b(fields.encode(), key=self._key, digest_size=16).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def _legacy_mac(self, fields: str) -> str:
        mac = hmac.new(self._legacy, fields.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def sign(
        self,
        intent_id: str,
        user_id: str,
        sale_id: str,
        sku: str,
        quantity: int,
        place: Appended | None = None,
    ) -> str:
        fields = _fields(intent_id, user_id, sale_id, sku, quantity)
        if place is None or place.log_time_ms is None:
            return self._mac(fields)
        where = f"{place.partition}.{place.log_time_ms}.{place.offset}"
        return f"{self._mac(fields + chr(0x1F) + where)}.{where}"

    def verify(
        self, receipt: str, intent_id: str, user_id: str, sale_id: str, sku: str, quantity: int
    ) -> Receipt | None:
        """What the receipt proves if this edge signed it for exactly these fields, else None."""
        fields = _fields(intent_id, user_id, sale_id, sku, quantity)
        mac, _, where = receipt.partition(".")
        # As bytes: compare_digest refuses str with non-ASCII characters (a 500 before).
        given = mac.encode()
        if where:
            if not hmac.compare_digest(self._mac(fields + "\x1f" + where).encode(), given):
                return None
            partition, at, *offset = where.split(".")
            return Receipt(int(partition), int(at), int(offset[0]) if offset else None)
        if hmac.compare_digest(self._mac(fields).encode(), given) or hmac.compare_digest(
            self._legacy_mac(fields).encode(), given
        ):
            return Receipt()
        return None


def _fields(intent_id: str, user_id: str, sale_id: str, sku: str, quantity: int) -> str:
    """What a receipt's MAC covers (with the log's place, when known)."""
    return f"{intent_id}\x1f{user_id}\x1f{sale_id}\x1f{sku}\x1f{quantity}"


# A recent intent: (sku, quantity, intent id, its acknowledgement). The acknowledgement is the
# pending future, then, once settled, where the log put the intent as a plain tuple
# (partition, offset, log time) or None (answered 202 before: nothing written). Settled
# entries are tuples of atomic values, which the cyclic GC stops tracking: a table of objects
# and futures made every full collection walk it (70-200 ms pauses at 100,000-200,000
# entries, the p99 of a busy app server).
Settled = tuple[int, int, int | None] | None
_Recent = tuple[str, int, str, "asyncio.Future[Appended | None] | Settled"]


class RecentIntents:
    """The last ``capacity`` intents placed with a client key, by (user, sale, key)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str, str], _Recent] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> _Recent | None:
        return self._entries.get(key)

    def put(self, key: tuple[str, str, str], entry: _Recent) -> None:
        self._entries[key] = entry
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def settle(self, key: tuple[str, str, str], entry: _Recent, ack: asyncio.Future[Any]) -> None:
        """Once ``entry``'s write is settled: keep where the log put it (a plain tuple), or
        drop the entry if the write failed, so that a retry writes it again; unless a newer
        attempt replaced the entry meanwhile."""
        if self._entries.get(key) is not entry:
            return
        if ack.cancelled() or ack.exception() is not None:
            del self._entries[key]
            return
        place = ack.result()
        settled = None if place is None else (place.partition, place.offset, place.log_time_ms)
        self._entries[key] = (entry[0], entry[1], entry[2], settled)

    def __len__(self) -> int:
        return len(self._entries)


def _now() -> datetime:
    return datetime.now(UTC)


def _settle_from(done: asyncio.Future[Appended | None], ack: asyncio.Future[Appended]) -> None:
    """Pass Kafka's acknowledgement (or its failure) on to the slot's future."""
    if done.done():
        return
    if ack.cancelled():
        done.set_exception(Unacknowledged("cancelled"))
    elif ack.exception() is not None:
        done.set_exception(Unacknowledged(str(ack.exception())))
    else:
        done.set_result(ack.result())


class IntakeService:
    """``place_intent``: validate against the sale, write to the log, wait for the ack."""

    def __init__(
        self,
        sales: SaleReader,
        log: IntentLog,
        receipts: Receipts,
        recent: RecentIntents,
        ack_timeout_s: float,
        clock: Callable[[], datetime] = _now,
        in_log: Callable[[str, str], bool] = lambda sale_id, sku: False,
        caught_up: Callable[[], Awaitable[bool]] | None = None,
        on_placed: Callable[[str, str, str, str, int, Appended], None] | None = None,
    ) -> None:
        self.sales = sales
        self.log = log
        self.receipts = receipts
        self.recent = recent
        self.ack_timeout_s = ack_timeout_s
        self.clock = clock
        self.in_log = in_log  # a SKU the log has opened, maybe not projected yet
        # True once in_log has read every fact committed before the call; False: not sure
        self.caught_up = caught_up
        self.on_placed = on_placed  # (user, intent, sale, SKU, quantity, where the log put it)

    async def place_intent(
        self, user_id: str, sale_id: str, sku: str, quantity: int, key: str | None
    ) -> Placed:
        """The placed intent once Kafka acknowledged it; Refused or Unacknowledged otherwise."""
        if key is None:  # nobody can retry it: no entry in the table
            await self._check(user_id, sale_id, sku, quantity, None)
            sent = time.perf_counter()
            intent_id, ack = self._submit(user_id, sale_id, sku, quantity, uuid.uuid4().hex)
            placed_at = await self._acknowledged(ack, intent_id)
            return self._placed(intent_id, user_id, sale_id, sku, quantity, placed_at, sent)
        slot = (user_id, sale_id, key)
        seen = self.recent.get(slot)
        if seen is not None:
            seen_sku, seen_quantity, seen_id, state = seen
            if (seen_sku, seen_quantity) != (sku, quantity):
                raise Refused(
                    "idempotency_conflict",
                    "this Idempotency-Key was already used for a different intent "
                    f"(sku {seen_sku!r}, quantity {seen_quantity}); use a new key",
                )
            if isinstance(state, asyncio.Future):
                place = await self._acknowledged(state, seen_id)
            else:
                place = None if state is None else Appended(*state)
            return self._placed(seen_id, user_id, sale_id, sku, quantity, place)
        # The slot is taken before the first await: a concurrent retry with this key waits for
        # this attempt instead of writing the intent a second time (or another body under it).
        intent_id = intent_id_for(user_id, sale_id, sku, key)
        done: asyncio.Future[Appended | None] = asyncio.get_running_loop().create_future()
        entry: _Recent = (sku, quantity, intent_id, done)
        self.recent.put(slot, entry)
        done.add_done_callback(lambda f: self.recent.settle(slot, entry, f))
        try:
            answered = await self._check(user_id, sale_id, sku, quantity, key)
            if answered is not None:
                done.set_result(None)  # answered 202 before: nothing to write
                return self._placed(answered, user_id, sale_id, sku, quantity, None)
            sent = time.perf_counter()
            produced_id, ack = self._submit(user_id, sale_id, sku, quantity, key)
        except BaseException as exc:
            if not done.done():  # a waiting retry is told the outcome is unknown: it retries
                done.set_exception(Unacknowledged(f"the first attempt failed: {exc!r}"))
            raise
        assert produced_id == intent_id
        ack.add_done_callback(lambda f: _settle_from(done, f))
        place = await self._acknowledged(done, intent_id)
        return self._placed(intent_id, user_id, sale_id, sku, quantity, place, sent)

    async def _check(
        self, user_id: str, sale_id: str, sku: str, quantity: int, key: str | None
    ) -> str | None:
        """Refused when the intent is surely lost; None when it may go to the writer; or the
        id of this very intent when an earlier attempt was answered 202 (the projection has
        it): a retry gets the same answer whatever the sale looks like now (its decision is
        the writer's, made once)."""
        try:
            check_intent(sale_id, await self.sales.sale(sale_id), sku, quantity, self.clock())
        except Refused as refused:
            if refused.code in ("unknown_sale", "unknown_sku"):
                known = await self._known(sale_id, sku)
                if known:
                    return None  # just opened, not projected yet: the writer decides
                if known is None:
                    refused = Refused(
                        "sale_unconfirmed",
                        f"this server cannot tell yet whether sale {sale_id!r} has SKU {sku!r}"
                        " (its view of the log lags); retry with the same Idempotency-Key",
                    )
            if key is None:
                raise refused from None
            intent_id = intent_id_for(user_id, sale_id, sku, key)
            if await self.sales.projected_intent(intent_id) != (user_id, sku, quantity):
                raise refused from None
            return intent_id
        return None

    async def _known(self, sale_id: str, sku: str) -> bool | None:
        """Whether the log has opened (sale, SKU) though the projection lacks it: True when the
        live feed has read its SaleOpened; False once the feed has read every fact committed
        before this call without one; None when it could not read that far in time."""
        if self.in_log(sale_id, sku):
            return True
        if self.caught_up is None:
            return False
        if not await self.caught_up():
            return None
        return self.in_log(sale_id, sku)

    def _submit(
        self, user_id: str, sale_id: str, sku: str, quantity: int, key: str
    ) -> tuple[str, asyncio.Future[Appended]]:
        try:
            return self.log.submit_intent_async(sale_id, sku, user_id, quantity, key)
        except (NotAcknowledged, BufferError, KafkaException) as exc:  # e.g. queue full
            raise Unacknowledged(str(exc)) from None

    async def _acknowledged(self, ack: asyncio.Future[T], intent_id: str) -> T:
        """Where the log put the intent, once acknowledged; waited for without cancelling it
        (a retry may wait for the same one). The producer reports every record within its
        ``message.timeout.ms``; if no report comes a second after that (the producer closed,
        its report timer stopped), the write is failed here, which frees the retry table's
        slot: a retry writes the intent again (same id: the writer keeps one)."""
        try:
            return await asyncio.wait_for(asyncio.shield(ack), self.ack_timeout_s + 1.0)
        except TimeoutError:
            if not ack.done():
                ack.set_exception(Unacknowledged("no acknowledgement in time"))
            why = "no acknowledgement in time"
        except asyncio.CancelledError:
            if not ack.cancelled():
                raise  # this request was cancelled, not the write
            why = "cancelled"
        except Exception as exc:
            why = str(exc)
        _unacknowledged.warn(intent_id=intent_id, reason=why)
        raise Unacknowledged(why) from None

    def _placed(
        self,
        intent_id: str,
        user_id: str,
        sale_id: str,
        sku: str,
        q: int,
        place: Appended | None,
        sent: float | None = None,
    ) -> Placed:
        """The 202's answer; a fresh one (``sent`` to Kafka at that ``perf_counter`` time and
        just acknowledged, not a retry answered from memory) starts waiting for its decision
        (``on_placed``)."""
        receipt = self.receipts.sign(intent_id, user_id, sale_id, sku, q, place)
        if sent is None:
            return Placed(intent_id, sale_id, sku, q, receipt)
        if place is not None and self.on_placed is not None:
            self.on_placed(user_id, intent_id, sale_id, sku, q, place)
        return Placed(intent_id, sale_id, sku, q, receipt, time.perf_counter() - sent)
