"""QueueProgress: where the writer says how far through its input it is, and the audit's check.

The expected facts are computed here from the decoded output alone (a running count of the
remaining units and the sequence numbers), not by the function the writer uses.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flashsale.progress_audit import check_progress
from processors.core import OpenSale, PlaceIntent, SaleTerms, progress_due
from processors.records import PROGRESS
from processors.writer import PartitionWriter
from tests.unit.writer_fakes import REGISTRY, InputLog, MemoryStore, loaded, persist

EVERY = 3


def _log(allocation: int, intents: int, every: int | None = EVERY) -> InputLog:
    log = InputLog()
    log.add(PlaceIntent("early", "zed", "s", "A", 1), 5)  # UNKNOWN_SALE: before the book
    terms = SaleTerms("s", "A", allocation, 1, 1, 10, 10**12, progress_every=every)
    log.add(OpenSale(terms), 10)
    for n in range(intents):  # one millisecond: the log time alone cannot tell them apart
        log.add(PlaceIntent(f"i{n}", f"u{n}", "s", "A", 1), 100)
    return log


def _records(log: InputLog, cuts: list[int]) -> list[tuple[str, dict[str, Any]]]:
    """The writer's output over ``log``, restarted from its store at every cut (a crash
    after each committed batch: the next batch is decided by a writer loaded from disk)."""
    writer, store = PartitionWriter(REGISTRY, 4), MemoryStore()
    out: list[bytes] = []
    edges = [0, *sorted(set(cuts)), len(log.records)]
    for a, b in itertools.pairwise(edges):
        if a < b:
            if a > 0:
                writer = loaded(store, a)
                writer.partition = 4
            out += [value for _, value in persist(writer, store, log.between(a, b)).events]
    return [REGISTRY.decode(v) for v in out]


def test_the_rule_is_every_nth_sequence_and_the_last_unit() -> None:
    assert [s for s in range(1, 10) if progress_due(3, s, 5, 5)] == [3, 6, 9]
    assert progress_due(3, 4, 1, 0) and not progress_due(3, 4, 0, 0)
    assert not progress_due(None, 3, 1, 0) and not progress_due(0, 3, 1, 0)


def test_the_writer_follows_every_nth_event_and_the_sell_out_with_its_input_place() -> None:
    log = _log(allocation=5, intents=10)
    records = _records(log, [])
    progress = [(i, r) for i, (n, r) in enumerate(records) if n == PROGRESS]
    # The sale's events: the early rejection (#1), SaleOpened (#2), ten decisions (#3..#12);
    # the fifth accepted intent (#7) takes the last unit.
    assert [r["after_sequence"] for _, r in progress] == [3, 6, 7, 9, 12]
    for i, r in progress:
        before = records[i - 1][1]  # each follows the event it names, at once
        assert before["sequence"] == r["after_sequence"]
        assert (r["remaining"], r["decided_at"]) == (before["remaining"], before["decided_at"])
        assert r["input_partition"] == 4
        assert log.records[r["input_offset"]].timestamp == r["decided_at"]
    assert [r["sold_out"] for _, r in progress] == [False, False, True, False, False]
    assert [r["remaining"] for _, r in progress] == [4, 1, 0, 0, 0]


def test_a_sale_without_a_cadence_and_an_older_one_get_none() -> None:
    assert not any(n == PROGRESS for n, _ in _records(_log(4, 10, every=None), []))


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 14), max_size=5))
def test_the_facts_are_the_same_however_the_log_is_cut_into_batches(cuts: list[int]) -> None:
    log = _log(allocation=5, intents=12)
    assert _records(log, cuts) == _records(log, [])


def _audit(records: list[tuple[str, dict[str, Any]]], log: InputLog) -> list[str]:
    events = [(n, r) for n, r in records if n != PROGRESS]
    progress = [r for n, r in records if n == PROGRESS]
    commands = {(4, rec.offset): (*REGISTRY.decode(rec.value or b""), rec.timestamp)
                for rec in log.records}  # fmt: skip
    return sorted({kind for kind, _ in check_progress(events, progress, commands)})


def test_the_audit_passes_the_writers_facts_and_names_each_tampering() -> None:
    log = _log(allocation=5, intents=10)
    records = _records(log, [5])
    assert _audit(records, log) == []
    at = next(i for i, (n, _) in enumerate(records) if n == PROGRESS)
    name, rec = records[at]
    assert _audit(records[:at] + records[at + 1 :], log) == ["progress-missing"]
    assert _audit([*records, (name, rec)], log) == ["progress-unexpected"]
    moved = {**rec, "after_sequence": rec["after_sequence"] + 1}
    assert _audit([*records[:at], (name, moved), *records[at + 1 :]], log) == [
        "progress-missing", "progress-unexpected"]  # fmt: skip
    wrong = {**rec, "remaining": rec["remaining"] + 1}
    assert _audit([*records[:at], (name, wrong), *records[at + 1 :]], log) == ["progress-mismatch"]
    elsewhere = {**rec, "input_offset": rec["input_offset"] + 1}
    assert _audit([*records[:at], (name, elsewhere), *records[at + 1 :]], log) == [
        "progress-offset"]  # fmt: skip
