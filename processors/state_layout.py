"""How the writer's state sits in its per-partition key-value store: batch deltas + checkpoints.

Why this layout: one table write per intent costs ~90 µs through Faust (its changelog record
alone), so the writer persists what a whole *batch* of input records changed as one *delta*,
and now and then a *checkpoint* (a full copy of the partition's live state). Every key a batch
writes carries the input offset the batch started at, so after a crash the local store can
be cut back to exactly the committed transactions: RocksDB writes are not rolled back when a
transaction aborts, but anything written under an offset at or past the committed input
position belongs to a transaction that never committed, and is discarded before the first
record is decided again.

Keys (one store per input partition; ``<o>`` is a 20-digit zero-padded input offset, so keys
sort in batch order)::

    L                      layout marker (``LAYOUT``), written with the first checkpoint
    D/<o>/<n>              delta chunk n of the batch starting at input offset o
    D/<o>/link             the state-writing batch before it and its chunk count: load
                           follows this chain from the checkpoint, so a missing delta or
                           chunk is detected (and the state rebuilt), never folded around
    S/<o>/<n>              checkpoint chunk n, taken by the batch starting at o
    C/<o>                  checkpoint o is complete (written after its chunks)
    Z/<sku>\\x1f<sale>/h    a settled sale: the offset that settled it and its chunk count
    Z/<sku>\\x1f<sale>/<n>  sorted 8-byte digests of the settled sale's intent ids

A delta and a checkpoint chunk have one format: a list of operations (``ops``) whose fold onto
empty ledgers rebuilds the state. State = fold(latest complete checkpoint below the committed
offset, then every delta from that checkpoint's offset up to the committed offset). Entries
that change after they were written (remaining units, a user's bought count, an order's
state and hold, a payment attempt's state) are written as absolute values, so the latest op
wins. The pre-queue is appended to
(``QUEUED``: the intents queued by a batch) until ``QUEUE_DONE`` (drawn or expired) clears it;
so are the intents a pause deferred (``DEFERRED``) until the pause ends (``UNDEFER``). The
``BOOK`` op carries the operator's flags (paused, units added, cancelled).
Settling a sale writes its digests under ``Z/`` and takes a checkpoint without its intents:
settled intents cost disk, not start-up time or memory. Each value stays below Kafka's 1 MB
record limit (``CHUNK_BYTES``).
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Iterator
from typing import Any, Protocol

import msgspec

from processors.core import Hold, SaleBook, SaleTerms, SkuLedger

# v5: the operator's flags on BOOK, deferred intents, paid orders kept whole (a store of an
# older layout is rebuilt from the command log, never read: it lacks them, and an older
# writer must not read this one and ignore what it does not know); v4: terms carry their
# rules version; v3: sequence per sale.
LAYOUT = b"flashsale-ledger-v5"
LAYOUT_KEY = b"L"
CHUNK_BYTES = 900_000
_SEP = "\x1f"
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()

# Operation codes (first element of each op list).
(SEQ, ORPHANS, TERMS, BOOK, BOUGHT, IDS, RETURNS, SETTLED, QUEUED, QUEUE_DONE, ORDERS, ATTEMPTS,
 WAITLIST, DEFERRED, UNDEFER) = range(15)  # fmt: skip
HELD = "held"  # an ORDERS entry's state while its order is held


class StoreReader(Protocol):
    """Read access to one partition's store (RocksDB in production, a dict in tests)."""

    def get(self, key: bytes) -> bytes | None: ...

    def keys_from(self, prefix: bytes) -> Iterator[bytes]:
        """Keys starting with ``prefix``, in sorted order."""
        ...

    def discard(self, key: bytes) -> None:
        """Delete a key locally (for leftovers of transactions that never committed)."""
        ...


def offset_key(kind: bytes, offset: int, chunk: int | None = None) -> bytes:
    """``kind/<offset>[/<chunk>]``."""
    key = kind + b"/" + b"%020d" % offset
    return key if chunk is None else key + b"/%04d" % chunk


def key_offset(key: bytes) -> int:
    """The offset part of a D/, S/ or C/ key."""
    return int(key[2:22])


def settled_prefix(sku: str, sale_id: str) -> bytes:
    """Prefix of a settled sale's Z/ keys."""
    return b"Z/" + f"{sku}{_SEP}{sale_id}".encode() + b"/"


# -- writing ----------------------------------------------------------------------------


def ledger_ops(ledger: SkuLedger) -> list[list[Any]]:
    """Operations that rebuild ``ledger`` from nothing (a checkpoint's content)."""
    sku = ledger.sku
    ops: list[list[Any]] = []
    if ledger.orphan_sequences:
        ops.append(seq_op(sku, ledger.orphan_sequences))
    if ledger.orphans:
        ops.append([ORPHANS, sku, sorted(ledger.orphans)])
    for sale_id, book in ledger.sales.items():
        ops += book_ops(sku, sale_id, book, terms=True, ids=book.decided, users=book.bought,
                        returns=book.returns, queued=book.queue,
                        orders=[*book.holds, *book.orders], attempts=book.attempts,
                        deferred=book.deferred)  # fmt: skip
    return ops


def seq_op(sku: str, sequences: dict[str, int]) -> list[Any]:
    """The sequence reached by each unknown sale id, flat: ``[SEQ, sku, [sale, n, ...]]``."""
    flat: list[Any] = []
    for sale_id, n in sequences.items():
        flat += (sale_id, n)
    return [SEQ, sku, flat]


def book_ops(
    sku: str,
    sale_id: str,
    book: SaleBook,
    *,
    terms: bool,
    ids: Any,
    users: Any,
    returns: Any = (),
    queued: Any = (),
    orders: Any = (),
    attempts: Any = (),
    deferred: Any = (),
    undeferred: bool = False,
) -> list[list[Any]]:
    """Operations recording ``book``: its terms (if asked), counters, given ids, users, refs,
    the given queued intents (or the end of its queue), the given orders and payment
    attempts as they stand now, and the given deferred intents (after the end of a pause,
    when ``undeferred``)."""
    ops: list[list[Any]] = []
    if terms:
        t = book.terms
        ops.append([TERMS, sku, sale_id, t.allocation, t.per_user_limit, t.per_order_max,
                    t.starts_at_ms, t.ends_at_ms, t.rules, t.prequeue_opens_at_ms,
                    t.draw_commitment, t.progress_every, t.hold_ms,
                    t.pay_grace_ms, t.waitlist_depth])  # fmt: skip
    if orders:
        ops.append([ORDERS, sku, sale_id, _orders_flat(book, orders)])
    if attempts:
        ops.append([ATTEMPTS, sku, sale_id, [x for a in attempts for x in (a, book.attempts[a])]])
    if book.terms.waitlist_depth:  # the whole line, as it stands (it is at most that deep)
        ops.append([WAITLIST, sku, sale_id, [x for entry in book.waitlist for x in entry]])
    if book.settled:
        ops.append([SETTLED, sku, sale_id, book.remaining, book.sequence])
        if ids:  # intents decided after settlement (SALE_ENDED) are remembered as ids
            ops.append([IDS, sku, sale_id, list(ids)])
        if book.queue_done:
            ops.append([QUEUE_DONE, sku, sale_id])
        return ops
    ops.append([BOOK, sku, sale_id, book.remaining, book.closed, book.sequence, book.paused,
                book.added, book.cancelled])  # fmt: skip
    if undeferred:
        ops.append([UNDEFER, sku, sale_id])
    if deferred:
        ops.append([DEFERRED, sku, sale_id, [x for entry in deferred for x in entry]])
    if users:
        bought = book.bought
        flat: list[Any] = []
        for user in users:
            flat += (user, bought[user])
        ops.append([BOUGHT, sku, sale_id, flat])
    if ids:
        ops.append([IDS, sku, sale_id, list(ids)])
    if returns:
        ops.append([RETURNS, sku, sale_id, sorted(returns)])
    if book.queue_done:
        ops.append([QUEUE_DONE, sku, sale_id])
    elif queued:
        ops.append([QUEUED, sku, sale_id, [x for entry in queued for x in entry]])
    return ops


def _orders_flat(book: SaleBook, order_ids: Any) -> list[Any]:
    """(order id, state, intent id, user id, quantity, pay_by, attempt) per order, flat: the
    hold's fields while held, empty ones once it left its hold."""
    flat: list[Any] = []
    for order_id in dict.fromkeys(order_ids):  # each once, in the order given
        hold = book.holds.get(order_id)
        if hold is not None:
            flat += (order_id, HELD, hold.intent_id, hold.user_id, hold.quantity, hold.pay_by,
                     hold.attempt or "")  # fmt: skip
        elif order_id in book.paid:  # kept whole: a cancel of the sale refunds it
            paid = book.paid[order_id]
            flat += (order_id, "paid", paid.intent_id, paid.user_id, paid.quantity, paid.pay_by,
                     paid.attempt or "")  # fmt: skip
        elif order_id in book.orders:
            flat += (order_id, book.orders[order_id], "", "", 0, 0, "")
    return flat


def _size(item: Any) -> int:
    """Most bytes msgpack takes for ``item`` (a str, an int, a bool, or a list of them: the
    waitlist, written whole and never split)."""
    if isinstance(item, str):
        n = len(item) if item.isascii() else len(item.encode())
        return n + (2 if n < 256 else 5)
    if isinstance(item, list):
        return 5 + sum(map(_size, item))
    return 9


# Items per entry of the ops whose last element is a flat list of entries (1 when not named).
_STEP = {BOUGHT: 2, SEQ: 2, QUEUED: 4, ORDERS: 7, ATTEMPTS: 2, DEFERRED: 3}


def chunk_ops(ops: list[list[Any]], limit: int = CHUNK_BYTES) -> list[bytes]:
    """Encode ``ops`` as one or more values, each under ``limit`` bytes.

    Long id/user lists are split across chunks; folding the chunks in order is the same as
    folding ``ops``. Sizes are upper bounds of the encoding (UTF-8 lengths, list headers).
    """
    chunks: list[bytes] = []
    current: list[list[Any]] = []
    size = 5  # the chunk's own list header
    for op in ops:
        split = op[0] in (SEQ, ORPHANS, BOUGHT, IDS, RETURNS, QUEUED, ORDERS, ATTEMPTS, DEFERRED)
        head = op[:-1] if split else op
        head_size = 10 + sum(map(_size, head))  # with the op's list header (and its items')
        if not split:
            if current and size + head_size >= limit:
                chunks.append(_enc.encode(current))
                current, size = [], 5
            current.append(op)
            size += head_size
            continue
        items = op[-1]
        step = _STEP.get(op[0], 1)
        start = 0
        while start < len(items):
            room = limit - size - head_size
            taken, end = 0, start
            while end < len(items):
                more = sum(map(_size, items[end : end + step]))
                if taken + more >= room:
                    break
                taken += more
                end += step
            if end == start:  # not one more item fits: start a new chunk
                if not current:
                    raise ValueError(f"an item of op {op[0]} does not fit in {limit} bytes")
                chunks.append(_enc.encode(current))
                current, size = [], 5
                continue
            current.append([*head, items[start:end]])
            size += taken + head_size
            start = end
    if current or not chunks:
        chunks.append(_enc.encode(current))
    return chunks


# -- reading ----------------------------------------------------------------------------


def fold(ledgers: dict[str, SkuLedger], value: bytes) -> None:
    """Apply one encoded delta or checkpoint chunk to ``ledgers``."""
    for op in _dec.decode(value):
        code, sku = op[0], op[1]
        ledger = ledgers.get(sku)
        if ledger is None:
            ledger = ledgers[sku] = SkuLedger(sku)
        if code == SEQ:
            flat = op[2]
            ledger.orphan_sequences.update(zip(flat[::2], flat[1::2], strict=True))
        elif code == ORPHANS:
            ledger.orphans.update(op[2])
        elif code == TERMS:
            sale_id = op[2]
            terms = SaleTerms(sale_id, sku, *op[3:])  # older stores: no pre-queue fields
            if sale_id not in ledger.sales:
                ledger.sales[sale_id] = SaleBook(terms, terms.allocation)  # BOOK/SETTLED follow
        else:
            book = ledger.sales[op[2]]
            if code == BOOK:
                book.remaining, book.closed, book.sequence = op[3], op[4], op[5]
                if len(op) > 6:  # older stores: no operator's flags
                    book.paused, book.added, book.cancelled = op[6], op[7], op[8]
            elif code == BOUGHT:
                flat = op[3]
                book.bought.update(zip(flat[::2], flat[1::2], strict=True))
            elif code == IDS:
                book.decided.update(op[3])
            elif code == RETURNS:
                book.returns.update(op[3])
            elif code == QUEUED:
                flat = op[3]
                for i in range(0, len(flat), 4):
                    intent_id, user_id, quantity, kind = flat[i : i + 4]
                    book.queue.append((intent_id, user_id, quantity, kind))
                    book.queued_ids.add(intent_id)
                    if kind == "ENTRY":
                        book.entrants.add(user_id)
            elif code == ORDERS:
                flat = op[3]
                for i in range(0, len(flat), 7):
                    order_id, state, intent_id, user_id, quantity, pay_by, attempt = flat[i : i + 7]
                    hold = Hold(intent_id, user_id, quantity, pay_by, attempt or None)
                    if state == HELD:
                        book.holds[order_id] = hold
                        book.orders.pop(order_id, None)
                    else:
                        book.holds.pop(order_id, None)
                        book.orders[order_id] = state
                        if state == "paid" and user_id:
                            book.paid[order_id] = hold
                        else:
                            book.paid.pop(order_id, None)
            elif code == WAITLIST:
                flat = op[3]
                book.waitlist = [
                    (flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)
                ]
                book.waitlisted_ids = {e[0] for e in book.waitlist}
            elif code == DEFERRED:
                flat = op[3]
                for i in range(0, len(flat), 3):
                    book.deferred.append((flat[i], flat[i + 1], flat[i + 2]))
                    book.deferred_ids.add(flat[i])
            elif code == UNDEFER:
                book.deferred, book.deferred_ids = [], set()
            elif code == ATTEMPTS:
                flat = op[3]
                book.attempts.update(zip(flat[::2], flat[1::2], strict=True))
            elif code == QUEUE_DONE:
                book.queue, book.queued_ids, book.entrants = [], set(), set()
                book.queue_done = True
            elif code == SETTLED:
                book.remaining, book.sequence = op[3], op[4]
                if not book.settled:  # a delta after settlement keeps the ids decided since
                    book.decided, book.bought, book.returns = set(), {}, set()
                    book.closed = book.settled = True
            else:  # a newer writer's op: folding around it would lose state
                raise ValueError(f"unknown state op {code} for {sku}/{op[2]}")


class SettledDigests:
    """``digest in settled`` answered from the store, loaded on first use (then cached)."""

    def __init__(self, reader: StoreReader, prefix: bytes, chunks: int) -> None:
        self._reader, self._prefix, self._chunks = reader, prefix, chunks
        self._sorted: array[int] | None = None

    def __contains__(self, digest: object) -> bool:
        if self._sorted is None:
            blob = b"".join(
                self._reader.get(self._prefix + b"%04d" % n) or b"" for n in range(self._chunks)
            )
            values = array("Q")
            values.frombytes(blob)
            if sys.byteorder != "little":
                values.byteswap()
            self._sorted = values
        i = bisect.bisect_left(self._sorted, digest)  # type: ignore[call-overload]
        return i < len(self._sorted) and self._sorted[i] == digest


def pack_digests(digests: frozenset[int]) -> list[bytes]:
    """Sorted little-endian 8-byte digests in chunks under ``CHUNK_BYTES``."""
    values = array("Q", sorted(digests))
    if sys.byteorder != "little":
        values.byteswap()
    blob = values.tobytes()
    per = (CHUNK_BYTES - 1) // 8 * 8  # whole digests, strictly under the limit
    return [blob[i : i + per] for i in range(0, max(len(blob), 1), per)] or [b""]


LINK_SUFFIX = b"/link"


def encode_link(previous: int | None, chunks: int) -> bytes:
    """Value of a delta's link key: the previous state-writing batch and the chunk count."""
    return _enc.encode([-1 if previous is None else previous, chunks])


def decode_link(value: bytes) -> tuple[int | None, int]:
    """(previous state-writing batch offset or None, chunk count) of a delta."""
    previous, chunks = _dec.decode(value)
    return (None if previous < 0 else int(previous)), int(chunks)


def encode_header(offset: int, chunks: int) -> bytes:
    """Value of a settled sale's ``h`` key."""
    return _enc.encode([offset, chunks])


def decode_header(value: bytes) -> tuple[int, int]:
    """(settling offset, chunk count) of a settled sale."""
    offset, chunks = _dec.decode(value)
    return int(offset), int(chunks)
