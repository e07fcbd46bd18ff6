"""The writer's persisted state: deltas, checkpoints, crash cuts and settled sales.

Every test runs the real ``PartitionWriter`` against ``MemoryStore``, a dict that keeps the
``StoreReader`` contract (sorted ``keys_from``, local ``discard``). A batch's writes are
applied to the store as the table would; a "crash" is a copy of the store taken with
whatever batches it holds, committed or not.
"""

from __future__ import annotations

import itertools
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from processors import state_layout as layout
from processors import writer as writer_mod
from processors.core import (
    AddUnits,
    CancelHold,
    CancelSale,
    CloseSale,
    OpenSale,
    PauseSale,
    PlaceIntent,
    RecordPayment,
    ResumeSale,
    ReturnUnits,
    RevealDraw,
    SaleBook,
    SaleTerms,
    SettleSale,
    SkuLedger,
    StartPayment,
    Tick,
    intent_digest,
)
from processors.core.prequeue import commitment
from processors.writer import PartitionWriter, StateMissing
from tests.unit.writer_fakes import (
    REGISTRY,
    InputLog,
    MemoryStore,
    assert_same_state,
    loaded,
    persist,
    snapshot,
)

SKUS = ("A", "B")
SEED = "5eed" * 16
USERS = ("ann", "bob", "cy", "dee")
SALE = SaleTerms("s", "A", allocation=3, per_user_limit=2, per_order_max=2,
                 starts_at_ms=0, ends_at_ms=1_000_000)  # fmt: skip


def offsets_in(store: MemoryStore) -> set[int]:
    """Input offsets the store's D/, S/, C/ keys and settled-sale headers were written at."""
    found = {layout.key_offset(k) for k in store.data if k[:2] in (b"D/", b"S/", b"C/")}
    headers = [v for k, v in store.data.items() if k.startswith(b"Z/") and k.endswith(b"/h")]
    return found | {layout.decode_header(v)[0] for v in headers}


def decoded(value: bytes) -> list[Any]:
    return list(msgspec.msgpack.decode(value))


# -- (a, b) random streams, random batches, random commits, crashes anywhere -------------


@st.composite
def input_logs(draw: st.DrawFn) -> InputLog:
    """Opens, intents, bursts, re-sends, closes, settles and junk for two SKUs; some sales
    have a pre-queue, revealed (early, with a wrong seed, or right) or left to expire."""
    terms = []
    for sku in SKUS:
        for k, start in enumerate(draw(st.lists(st.integers(0, 5), min_size=1, max_size=2))):
            allocation = draw(st.integers(0, 5))
            limit, order_max = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            end = start + draw(st.integers(5, 60))
            queued = draw(st.booleans())
            opens = start if queued else None
            starts = start + draw(st.integers(1, 20)) if queued else start
            held = draw(st.sampled_from([None, None, 1_000]))  # holds: paid, expired, cancelled
            terms.append(SaleTerms(f"s{k}", sku, allocation, limit, order_max, starts,
                                   max(end, starts + 1), 1, opens,
                                   commitment(SEED) if queued else None, None, held,
                                   draw(st.sampled_from([0, 300])),
                                   draw(st.sampled_from([0, 2])) if held else 0))  # fmt: skip
    log = InputLog()
    now = 0
    for t in terms:
        log.add(OpenSale(t), now)
    placed: list[PlaceIntent] = []
    kinds = ["intent"] * 6 + ["burst", "resend", "resend", "close", "settle", "junk",
                              "reveal", "reveal", "tick", "pay", "pay", "result", "result",
                              "cancel", "wait"]  # fmt: skip
    attempts: list[tuple[PlaceIntent, str]] = []
    for _ in range(draw(st.integers(1, 50))):
        now += draw(st.integers(0, 3))
        kind = draw(st.sampled_from(kinds))
        sale = draw(st.sampled_from(terms))
        if kind == "close":
            log.add(CloseSale(sale.sale_id, sale.sku), now)
        elif kind == "settle":
            log.add(SettleSale(sale.sale_id, sale.sku), now)
        elif kind == "junk":
            log.add_value(draw(st.sampled_from([None, b"\x00junk"])), now)
        elif kind == "reveal":
            log.add(RevealDraw(sale.sale_id, sale.sku, draw(st.sampled_from([SEED, "0" * 64]))),
                    now)  # fmt: skip
        elif kind == "tick":
            log.add(Tick(""), now)
        elif kind == "wait":  # long enough for holds to expire at the next tick
            now += draw(st.sampled_from([400, 1_000]))
        elif kind == "pay" and placed:
            intent = draw(st.sampled_from(placed))
            user = draw(st.sampled_from([intent.user_id, intent.user_id, "intruder"]))
            attempt = f"a{len(attempts)}" if draw(st.booleans()) or not attempts else \
                draw(st.sampled_from(attempts))[1]  # fmt: skip
            attempts.append((intent, attempt))
            log.add(StartPayment(intent.sale_id, intent.sku, f"ord-{intent.intent_id}", user,
                                 attempt), now)  # fmt: skip
        elif kind == "result" and attempts:
            intent, attempt = draw(st.sampled_from(attempts))
            log.add(RecordPayment(intent.sale_id, intent.sku, f"ord-{intent.intent_id}",
                                  attempt, draw(st.booleans())), now)  # fmt: skip
        elif kind == "cancel" and placed:
            intent = draw(st.sampled_from(placed))
            log.add(CancelHold(intent.sale_id, intent.sku, f"ord-{intent.intent_id}",
                               intent.user_id), now)  # fmt: skip
        elif kind == "resend" and placed:
            log.add(draw(st.sampled_from(placed)), now)
        else:
            sale_id = draw(st.sampled_from([sale.sale_id, sale.sale_id, "nope"]))
            for _ in range(draw(st.integers(2, 5)) if kind == "burst" else 1):
                cmd = PlaceIntent(f"i{len(placed)}", draw(st.sampled_from(USERS)), sale_id,
                                  sale.sku, draw(st.sampled_from([-1, 0, 1, 1, 2, 3])))  # fmt: skip
                placed.append(cmd)
                log.add(cmd, now)
    return log


@st.composite
def lifecycle_logs(draw: st.DrawFn) -> InputLog:
    """Sales with holds and a waitlist on two SKUs: many people, payments started, charged,
    declined and late, cancels, expiries (waits and ticks), returned units, and the
    operator's pauses, resumes, added units and cancels."""
    log = InputLog()
    terms = [SaleTerms("h", sku, draw(st.integers(1, 3)), 1, 1, 0, 10**9, hold_ms=1_000,
                       pay_grace_ms=draw(st.sampled_from([0, 300])),
                       waitlist_depth=draw(st.sampled_from([0, 2, 3])))
             for sku in SKUS]  # fmt: skip
    for t in terms:
        log.add(OpenSale(t), 0)
    now, placed, attempts = 0, [], []
    kinds = ["intent"] * 4 + ["pay", "pay", "result", "result", "cancel", "wait", "tick",
                              "return", "pause", "resume", "add", "call-off"]  # fmt: skip
    for _ in range(draw(st.integers(1, 40))):
        now += draw(st.integers(0, 50))
        kind, sku = draw(st.sampled_from(kinds)), draw(st.sampled_from(SKUS))
        if kind == "intent" or not placed:
            cmd = PlaceIntent(f"i{len(placed)}", f"u{len(placed)}", "h", sku, 1)
            placed.append(cmd)
            log.add(cmd, now)
        elif kind == "pay":
            intent = draw(st.sampled_from(placed))
            attempt = f"a{len(attempts)}"
            attempts.append((intent, attempt))
            log.add(StartPayment("h", intent.sku, f"ord-{intent.intent_id}", intent.user_id,
                                 attempt), now)  # fmt: skip
        elif kind == "result" and attempts:
            intent, attempt = draw(st.sampled_from(attempts))
            log.add(RecordPayment("h", intent.sku, f"ord-{intent.intent_id}", attempt,
                                  draw(st.booleans())), now)  # fmt: skip
        elif kind == "cancel":
            intent = draw(st.sampled_from(placed))
            log.add(CancelHold("h", intent.sku, f"ord-{intent.intent_id}", intent.user_id), now)
        elif kind == "wait":
            now += draw(st.sampled_from([500, 1_000]))
        elif kind == "return":
            log.add(ReturnUnits("h", sku, 1, f"r{now}"), now)
        elif kind == "pause":
            log.add(PauseSale("h", sku), now)
        elif kind == "resume":
            log.add(ResumeSale("h", sku), now)
        elif kind == "add":
            log.add(AddUnits("h", sku, draw(st.integers(1, 2)), f"add{now % 3}"), now)
        elif kind == "call-off" and draw(st.integers(0, 3)) == 0:
            log.add(CancelSale("h", sku, "test"), now)
        else:
            log.add(Tick(""), now)
    return log


@st.composite
def batch_bounds(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    """Random consecutive batches [first, end) covering offsets 0..size-1."""
    cuts = draw(st.sets(st.integers(1, max(size - 1, 1)), max_size=size)) - {size}
    edges = [0, *sorted(cuts), size]
    return list(itertools.pairwise(edges))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    log=st.one_of(input_logs(), lifecycle_logs()),
    every=st.sampled_from([0, 1, 2, 3, 2_000]),
)
def test_state_loaded_after_a_crash_at_any_committed_offset_equals_the_live_state(
    data: st.DataObject, log: InputLog, every: int
) -> None:
    """Fold(checkpoint + deltas) = live state, whatever was committed, deleted or left over.

    Batches are cut at random; the committed offset handed to the writer lags a random
    number of batches behind (or is unknown). After every batch the local store is copied
    as a crash would leave it, and loaded at each offset the group may have committed by
    then: the state must equal the live state after exactly the batches before that offset,
    and nothing written at or after it may survive the load.
    """
    note(f"{log!r} every={every}")
    bounds = data.draw(batch_bounds(len(log.records)))
    with mock.patch.object(writer_mod, "CHECKPOINT_EVERY", every):
        writer = PartitionWriter(REGISTRY, 0)
        store = MemoryStore()
        states: dict[int, dict[str, SkuLedger]] = {0: {}}
        decisions: dict[int, list[tuple[bytes, bytes]]] = {}
        floor = 0  # highest offset handed over as committed: the group never goes below it
        for k, (first, end) in enumerate(bounds):
            lag = data.draw(st.none() | st.integers(0, 2), label="commit lag")
            if lag is not None:
                floor = max(floor, bounds[max(k - lag, 0)][0])
            result = persist(writer, store, log.between(first, end), None if lag is None else floor)
            states[end] = snapshot(writer.ledgers)
            decisions[first] = result.events
            assert_same_state(writer.ledgers, states[end])
            for cut in [f for f in states if floor <= f <= end]:
                crashed = store.copy()
                assert_same_state(loaded(crashed, cut).ledgers, states[cut])
                assert all(o < cut for o in offsets_in(crashed)), (cut, sorted(crashed.data))
        # Resumed at any of those offsets, the writer re-decides byte-identically.
        cut = data.draw(st.sampled_from([f for f, _ in bounds if f >= floor] or [floor]))
        again = loaded(store.copy(), cut).handle_batch(log.between(cut, len(log.records)), None)
        assert again.events == [d for f in sorted(decisions) if f >= cut for d in decisions[f]]


def test_superseded_keys_are_deleted_once_a_newer_checkpoint_is_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(writer_mod, "CHECKPOINT_EVERY", 1)
    log = InputLog()
    log.add(OpenSale(SALE), 0)
    for i in range(40):
        log.add(PlaceIntent(f"i{i}", USERS[i % 4], "s", "A", 1), 1)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    firsts = list(range(0, 41, 3))
    checkpoints: list[int] = []
    for first in firsts:
        result = persist(writer, store, log.between(first, first + 3), committed=first)
        if result.checkpoint:
            checkpoints.append(first)
    # Deltas and checkpoints alternate; only what the two latest checkpoints rest on stays:
    # the older one is still needed until the newer one's batch is committed.
    assert len(checkpoints) >= 6
    assert offsets_in(store) == set(firsts[firsts.index(checkpoints[-2]) :])
    assert_same_state(loaded(store.copy(), 42).ledgers, writer.ledgers)


# -- (b) crash cut ----------------------------------------------------------------------


def test_writes_of_batches_at_or_after_the_committed_offset_are_discarded_on_load() -> None:
    log = InputLog()
    log.add(OpenSale(SALE), 0)
    for i in range(9):
        log.add(PlaceIntent(f"i{i}", USERS[i % 4], "s", "A", 1), 1)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    persist(writer, store, log.between(0, 4))
    committed_state = snapshot(writer.ledgers)
    persist(writer, store, log.between(4, 7), committed=4)  # never committed:
    persist(writer, store, log.between(7, 10), committed=4)  # the crash came first
    assert any(layout.key_offset(k) >= 4 for k in store.keys_from(b"D/"))

    resumed = loaded(store, 4)

    assert_same_state(resumed.ledgers, committed_state)
    assert resumed.ledgers["A"].sales["s"].remaining == 0
    assert offsets_in(store) == {0}, "leftovers of the uncommitted batches are gone"
    # The same records, batched differently this time, are decided as before.
    redo = persist(resumed, store, log.between(4, 10), committed=4)
    assert [REGISTRY.decode(v)[1]["sequence"] for _, v in redo.events] == list(range(5, 11))
    assert_same_state(loaded(store.copy(), 10).ledgers, writer.ledgers)


# -- (c) state missing ------------------------------------------------------------------


@pytest.mark.parametrize("lose", ["a whole delta", "a delta chunk", "a checkpoint chunk"])
def test_a_store_missing_a_committed_write_is_refused_not_folded_around(lose: str) -> None:
    log = InputLog()
    log.add(OpenSale(SALE), 0)
    for i in range(12):
        log.add(PlaceIntent(f"i{i}", USERS[i % 4], "s", "A", 1), 1)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    for first in (0, 4, 8):
        persist(writer, store, log.between(first, first + 4))
    loaded(store.copy(), 13)  # complete: loads
    deltas = sorted(k for k in store.keys_from(b"D/") if not k.endswith(layout.LINK_SUFFIX))
    if lose == "a whole delta":
        doomed = [k for k in store.keys_from(layout.offset_key(b"D", 4))]
    elif lose == "a delta chunk":
        doomed = deltas[-1:]
    else:
        doomed = list(store.keys_from(b"S/"))[:1]
    for key in doomed:
        store.discard(key)
    with pytest.raises(StateMissing, match="incomplete"):
        loaded(store, 13)


def test_an_empty_store_is_missing_state_once_offsets_were_committed() -> None:
    with pytest.raises(StateMissing, match="offset 7"):
        loaded(MemoryStore(), 7)


def test_an_empty_store_at_offset_zero_is_a_fresh_start() -> None:
    writer = PartitionWriter(REGISTRY, 0)
    info = writer.load(MemoryStore(), 0)
    assert writer.ledgers == {} and info["chunks_folded"] == 0


def test_a_layout_marker_left_by_a_batch_that_never_committed_is_not_state() -> None:
    """Rebuilt by replay, then killed before the first batch commits: still nothing stored."""
    log = InputLog()
    log.add(OpenSale(SALE), 0)
    for i in range(8):
        log.add(PlaceIntent(f"i{i}", USERS[i % 4], "s", "A", 1), 1)
    live = PartitionWriter(REGISTRY, 0)
    live.handle_batch(log.between(0, 9), None)
    store = MemoryStore()  # a new disk: the committed offset is 5, the store empty

    writer = PartitionWriter(REGISTRY, 0)
    with pytest.raises(StateMissing):
        writer.load(store, 5)
    writer.rebuild(log.between(0, 5))
    persist(writer, store, log.between(5, 7), committed=5)  # killed before the commit

    with pytest.raises(StateMissing):
        loaded(store, 5)
    assert offsets_in(store) == set(), "the uncommitted checkpoint was discarded"
    writer = PartitionWriter(REGISTRY, 0)
    writer.rebuild(log.between(0, 5))
    persist(writer, store, log.between(5, 6), committed=5)
    persist(writer, store, log.between(6, 9), committed=6)
    assert_same_state(loaded(store, 9).ledgers, live.ledgers)


# -- (d) chunking -----------------------------------------------------------------------


def test_a_big_ledger_is_chunked_under_the_record_limit_and_folds_back_whole() -> None:
    unknown = {f"nope-{i:06d}": 1 + i % 7 for i in range(30_000)}  # its SEQ op alone is > 1 chunk
    ledger = SkuLedger("SKU-big", orphans={f"orphan-{i:06d}" for i in range(50)},
                       orphan_sequences=unknown)  # fmt: skip
    book = SaleBook(SaleTerms("sale-big", "SKU-big", 10**6, 5, 5, 0, 10**13), remaining=400_000,
                    sequence=200_000)  # fmt: skip
    book.decided = {f"{i:032x}" for i in range(200_000)}
    book.bought = {f"user-{i:08d}": 1 + i % 5 for i in range(100_000)}
    ledger.sales["sale-big"] = book

    chunks = layout.chunk_ops(layout.ledger_ops(ledger))

    assert len(chunks) > 1 and all(len(c) < layout.CHUNK_BYTES for c in chunks)
    folded: dict[str, SkuLedger] = {}
    for chunk in chunks:
        layout.fold(folded, chunk)
    assert folded == {"SKU-big": ledger}


ids = st.text(min_size=1, max_size=128)


@settings(max_examples=100, deadline=None)
@given(
    decided=st.sets(ids, max_size=80),
    bought=st.dictionaries(ids, st.integers(1, 2**40), max_size=40),
    orphans=st.sets(ids, max_size=20),
    sale_ids=st.lists(ids, min_size=1, max_size=3, unique=True),
    limit=st.integers(2_000, 20_000),
)
def test_chunks_stay_under_any_limit_for_any_ids_and_fold_to_the_same_ledger(
    decided: set[str], bought: dict[str, int], orphans: set[str], sale_ids: list[str], limit: int
) -> None:
    ledger = SkuLedger("S\u00e9-\U0001f600" * 20, orphans=orphans,
                       orphan_sequences={o: len(o) for o in orphans})  # fmt: skip
    for sale_id in sale_ids:
        book = SaleBook(SaleTerms(sale_id, ledger.sku, 10, 3, 2, 0, 10), remaining=4,
                        sequence=len(decided))  # fmt: skip
        book.decided, book.bought = set(decided), dict(bought)
        ledger.sales[sale_id] = book

    chunks = layout.chunk_ops(layout.ledger_ops(ledger), limit)

    assert all(len(c) < limit for c in chunks), [len(c) for c in chunks]
    folded: dict[str, SkuLedger] = {}
    for chunk in chunks:
        layout.fold(folded, chunk)
    assert folded == {ledger.sku: ledger}


# -- (e) settled sales ------------------------------------------------------------------


def test_a_settled_sale_leaves_the_checkpoint_and_is_recognised_by_digest_after_load() -> None:
    log = InputLog()
    log.add(OpenSale(SALE), 0)
    intents = [PlaceIntent(f"intent-{i:04d}", USERS[i % 4], "s", "A", 1) for i in range(6)]
    for cmd in intents:
        log.add(cmd, 1)
    log.add(CloseSale("s", "A"), 2)
    log.add(SettleSale("s", "A"), 3)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    persist(writer, store, log.between(0, 4))
    settled = persist(writer, store, log.between(4, 9), committed=4)

    assert settled.checkpoint and writer.ledgers["A"].sales["s"].settled
    checkpoint = [v for k, v in store.data.items() if k.startswith(b"S/00000000000000000004")]
    assert checkpoint, sorted(store.data)
    ops = [op for value in checkpoint for op in decoded(value)]
    assert [op for op in ops if op[0] == layout.IDS] == []
    assert not any(cmd.intent_id.encode() in value for value in checkpoint for cmd in intents)

    resumed = loaded(store, 9)
    book = resumed.ledgers["A"].sales["s"]
    assert isinstance(book.settled_digests, layout.SettledDigests)
    assert book.decided == set() and book.bought == {} and book.remaining == 0
    assert all(intent_digest(cmd.intent_id) in book.settled_digests for cmd in intents)
    assert intent_digest("intent-never") not in book.settled_digests

    log.add(intents[2], 5)  # a repeat of a forgotten intent
    log.add(PlaceIntent("intent-late", "eve", "s", "A", 1), 5)
    after = persist(resumed, store, log.between(9, 11), committed=9)
    assert after.repeats == 1 and len(after.events) == 1
    name, record = REGISTRY.decode(after.events[0][1])
    assert (name, record["reason"], record["sequence"]) == ("IntentRejected", "SALE_ENDED", 10)

    # The late intent is remembered too: a repeat after another restart stays silent.
    log.add(PlaceIntent("intent-late", "eve", "s", "A", 1), 6)
    again = persist(loaded(store, 11), store, log.between(11, 12), committed=11)
    assert again.events == [] and again.repeats == 1


def test_a_rebuild_by_replay_keeps_the_digests_of_sales_settled_in_the_replayed_log() -> None:
    log = InputLog()
    log.add(OpenSale(SALE), 0)
    for i in range(4):
        log.add(PlaceIntent(f"i{i}", USERS[i], "s", "A", 1), 1)
    log.add(SettleSale("s", "A"), SALE.ends_at_ms)
    log.add(PlaceIntent("i9", "eve", "s", "A", 1), SALE.ends_at_ms + 1)
    store = MemoryStore()

    writer = PartitionWriter(REGISTRY, 0)
    writer.rebuild(log.between(0, 6))
    persist(writer, store, log.between(6, 7), committed=6)

    resumed = loaded(store, 7)
    book = resumed.ledgers["A"].sales["s"]
    assert all(intent_digest(f"i{i}") in book.settled_digests for i in range(4))
    log.add(PlaceIntent("i1", "u1", "s", "A", 1), SALE.ends_at_ms + 2)
    assert resumed.handle_batch(log.between(7, 8), 7).events == []


# -- (f) dead letters -------------------------------------------------------------------


def test_undecodable_or_foreign_records_are_dead_letters_and_change_nothing() -> None:
    log = InputLog()
    log.add(OpenSale(SALE), 0)
    log.add(PlaceIntent("i1", "ann", "s", "A", 1), 1)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    persist(writer, store, log.between(0, 2))
    before, stored = snapshot(writer.ledgers), dict(store.data)
    accepted = REGISTRY.encode("IntentAccepted", {
        "event_id": "e", "correlation_id": "i1", "producer": "t", "occurred_at": 1,
        "intent_id": "i1", "sale_id": "s", "sku": "A", "user_id": "ann", "quantity": 1,
        "order_id": "ord-i1", "remaining": 2, "sequence": 1, "decided_at": 1})  # fmt: skip
    log.add_value(b"\x00garbage", 2)
    log.add_value(None, 2)
    log.add_value(accepted, 2)

    result = persist(writer, store, log.between(2, 5), committed=2)

    assert [(d.offset, d.reason) for d in result.dead_letters] == [
        (2, "bad-magic"),
        (3, "empty-value"),
        (4, "wrong-schema"),
    ]
    assert result.dead_letters[2].value == accepted and result.dead_letters[0].key == b"k"
    assert result.events == [] and result.writes == [] and result.repeats == 0
    assert writer.ledgers == before and store.data == stored
