"""The writer's state store contract: every adapter passes the same cases.

Adapters: ``MemoryStore`` (the unit tests' dict) and ``RocksStoreReader`` over a real
RocksDB (rocksdict, as Faust's tables keep it). The writer reads its state through
``state_layout.StoreReader`` only, so what it loads must not depend on the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rocksdict import Rdict

from processors.core import CloseSale, OpenSale, PlaceIntent, SaleTerms, SettleSale
from processors.faust_runtime import RocksStoreReader
from processors.state_layout import StoreReader
from processors.writer import PartitionWriter
from tests.unit.writer_fakes import REGISTRY, InputLog, MemoryStore, assert_same_state

NOW = 1_800_000_000_000
Write = Callable[[list[tuple[bytes, bytes | None]]], None]


@pytest.fixture(params=["memory", "rocksdb"])
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[StoreReader, Write]]:
    """A store under test and how to write into it as the table would (None deletes)."""
    if request.param == "memory":
        memory = MemoryStore()
        yield memory, memory.apply
        return
    db = Rdict(str(tmp_path / "rocks"))

    def write(writes: list[tuple[bytes, bytes | None]]) -> None:
        for key, value in writes:
            if value is None:
                del db[key]
            else:
                db[key] = value

    yield RocksStoreReader.over(db), write
    db.close()


def test_get_returns_bytes_or_none(adapter: tuple[StoreReader, Write]) -> None:
    store, write = adapter
    assert store.get(b"D/1") is None
    write([(b"D/1", b"\x00value\xff")])
    value = store.get(b"D/1")
    assert value == b"\x00value\xff" and type(value) is bytes


def test_keys_from_is_sorted_and_stops_at_the_prefix(adapter: tuple[StoreReader, Write]) -> None:
    store, write = adapter
    keys = [b"D/2", b"D/10", b"D/1\xff", b"D0", b"C/1", b"D/", b"E"]
    write([(k, b"v") for k in keys])
    assert list(store.keys_from(b"D/")) == sorted(k for k in keys if k.startswith(b"D/"))
    assert list(store.keys_from(b"Z/")) == []


def test_keys_from_is_a_snapshot_callers_may_discard_while_iterating(
    adapter: tuple[StoreReader, Write],
) -> None:
    store, write = adapter
    write([(b"D/%d" % i, b"v") for i in range(5)])
    seen = []
    for key in store.keys_from(b"D/"):
        store.discard(key)
        seen.append(key)
    assert seen == [b"D/%d" % i for i in range(5)]
    assert list(store.keys_from(b"D/")) == [] and store.get(b"D/0") is None
    store.discard(b"D/missing")  # discarding what is not there is fine


def test_the_writer_loads_the_same_state_from_every_adapter(
    adapter: tuple[StoreReader, Write],
) -> None:
    store, write = adapter
    terms = SaleTerms("s", "A", allocation=3, per_user_limit=2, per_order_max=2,
                      starts_at_ms=NOW - 1, ends_at_ms=NOW + 60_000)  # fmt: skip
    other = SaleTerms("t", "A", allocation=5, per_user_limit=5, per_order_max=5,
                      starts_at_ms=NOW - 1, ends_at_ms=NOW + 60_000)  # fmt: skip
    log = InputLog()
    log.add(OpenSale(terms), NOW)
    log.add(OpenSale(other), NOW)
    for i in range(8):
        log.add(PlaceIntent(f"i{i}", f"u{i % 3}", "s" if i % 2 else "t", "A", 1 + i % 2), NOW)
    log.add(CloseSale("t", "A"), NOW)
    log.add(SettleSale("t", "A"), NOW)
    log.add(PlaceIntent("late", "u9", "s", "A", 1), NOW)
    live = PartitionWriter(REGISTRY, 0)
    committed = None
    for first in range(0, len(log.records), 4):  # batches of 4, each committed before the next
        write(live.handle_batch(log.between(first, first + 4), committed).writes)
        committed = first + 4
    resumed = PartitionWriter(REGISTRY, 0)
    resumed.load(store, len(log.records))
    assert_same_state(resumed.ledgers, live.ledgers)
    assert resumed.ledgers["A"].sales["s"].remaining == live.ledgers["A"].sales["s"].remaining
