"""Settling a closed sale bounds the writer's state without ever re-deciding an intent."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from processors import state_layout as layout
from processors.core import (
    CloseSale,
    IntentRejected,
    OpenSale,
    PlaceIntent,
    RejectionReason,
    SaleRefused,
    SaleSettled,
    SaleTerms,
    SettleSale,
    SkuLedger,
    intent_digest,
)
from processors.writer import PartitionWriter
from tests.unit.core_steps import step
from tests.unit.writer_fakes import REGISTRY, InputLog, MemoryStore, loaded, persist

T0 = 1_000
TERMS = SaleTerms("s", "A", allocation=3, per_user_limit=2, per_order_max=2,
                  starts_at_ms=T0, ends_at_ms=T0 + 10_000)  # fmt: skip


def sold(n: int) -> SkuLedger:
    ledger = SkuLedger("A")
    step(ledger, OpenSale(TERMS), T0)
    for i in range(n):
        step(ledger, PlaceIntent(f"i{i}", f"u{i}", "s", "A", 1), T0 + 1)
    return ledger


def test_open_sale_cannot_be_settled() -> None:
    ledger = sold(2)
    events = step(ledger, SettleSale("s", "A"), T0 + 2)
    assert isinstance(events[0], SaleRefused)
    assert ledger.sales["s"].decided == {"i0", "i1"} and not ledger.sales["s"].settled


def test_settled_sale_forgets_decisions_but_never_redecides_them() -> None:
    ledger = sold(5)  # 3 accepted, 2 sold out
    step(ledger, CloseSale("s", "A"), T0 + 3)
    (settled,) = step(ledger, SettleSale("s", "A"), T0 + 4)
    assert isinstance(settled, SaleSettled)
    ids = [f"i{i}" for i in range(5)]
    assert settled.intents == 5
    # Opened (1), five decisions (2-6), closed (7), settled (8).
    assert (settled.sequence, settled.remaining) == (8, 0)
    book = ledger.sales["s"]
    assert book.decided == set() and book.bought == {} and book.settled and book.closed
    assert book.settled_digests == frozenset(map(intent_digest, ids))
    # A repeat of a decided intent gets nothing new: its first decision stands.
    assert step(ledger, PlaceIntent("i0", "u0", "s", "A", 1), T0 + 5) == []
    assert ledger.sales["s"].sequence == 8
    # A brand-new intent still gets exactly one decision, with the next sequence number.
    (new,) = step(ledger, PlaceIntent("fresh", "u9", "s", "A", 1), T0 + 5)
    assert isinstance(new, IntentRejected) and new.reason is RejectionReason.SALE_ENDED
    assert new.sequence == 9
    assert step(ledger, PlaceIntent("fresh", "u9", "s", "A", 1), T0 + 6) == []
    assert step(ledger, SettleSale("s", "A"), T0 + 6) == []  # idempotent


def test_sale_past_its_window_can_be_settled_without_close() -> None:
    ledger = sold(1)
    (settled,) = step(ledger, SettleSale("s", "A"), TERMS.ends_at_ms)
    assert isinstance(settled, SaleSettled) and settled.remaining == 2


def stored_digests(digests: frozenset[int]) -> layout.SettledDigests:
    """``digests`` packed into a store as the writer does, read back lazily."""
    prefix = layout.settled_prefix("A", "s")
    chunks = layout.pack_digests(digests)
    store = MemoryStore({prefix + b"%04d" % n: c for n, c in enumerate(chunks)})
    return layout.SettledDigests(store, prefix, len(chunks))


@settings(max_examples=100, deadline=None)
@given(
    digests=st.frozensets(st.integers(0, 2**64 - 1), max_size=50),
    probes=st.lists(st.integers(0, 2**64 - 1), max_size=20),
)
def test_settled_digests_answer_membership_exactly_as_the_set(
    digests: frozenset[int], probes: list[int]
) -> None:
    settled = stored_digests(digests)
    for digest in [*digests, *probes, 0, 2**64 - 1]:
        assert (digest in settled) == (digest in digests)


def test_many_settled_digests_are_packed_in_chunks_under_the_record_limit() -> None:
    digests = frozenset(intent_digest(f"intent-{i}") for i in range(300_000))
    chunks = layout.pack_digests(digests)
    assert len(chunks) == 3 and all(len(c) < layout.CHUNK_BYTES for c in chunks)
    values = array("Q", b"".join(chunks))
    assert list(values) == sorted(digests)
    settled = stored_digests(digests)
    assert all(intent_digest(f"intent-{i}") in settled for i in range(0, 300_000, 997))
    assert intent_digest("intent-300000") not in settled


def test_writer_stores_a_settled_sales_digests_under_its_own_keys() -> None:
    log = InputLog()
    log.add(OpenSale(TERMS), T0)
    for i in range(4):
        log.add(PlaceIntent(f"i{i}", f"u{i % 2}", "s", "A", 1), T0 + 1)
    log.add(CloseSale("s", "A"), T0 + 2)
    log.add(SettleSale("s", "A"), T0 + 3)
    writer, store = PartitionWriter(REGISTRY, 0), MemoryStore()
    persist(writer, store, log.between(0, 5))
    result = persist(writer, store, log.between(5, 7), committed=5)

    prefix = layout.settled_prefix("A", "s")
    header = store.get(prefix + b"h")
    assert header is not None and layout.decode_header(header) == (6, 1)
    chunk = store.get(prefix + b"0000")
    assert chunk is not None
    assert list(array("Q", chunk)) == sorted(intent_digest(f"i{i}") for i in range(4))
    assert result.checkpoint
    assert [REGISTRY.decode(v)[0] for _, v in result.events] == ["SaleClosed", "SaleSettled"]

    # Loaded before the settling batch committed, the sale is open again: the header is
    # a leftover of that batch and goes, the settlement will be redone identically.
    crashed = store.copy()
    earlier = loaded(crashed, 5)
    assert prefix + b"h" not in crashed.data
    assert not earlier.ledgers["A"].sales["s"].settled
    assert earlier.ledgers["A"].sales["s"].decided == {f"i{i}" for i in range(4)}
    persist(earlier, crashed, log.between(5, 7), committed=5)
    assert crashed.data == store.data
