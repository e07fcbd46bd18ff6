"""The Faust seam's own checks: pinned versions, fault specs (no broker needed)."""

from __future__ import annotations

from typing import Any

import faust
import pytest

from processors import batch_runtime as br
from processors import faust_runtime as rt


def test_runs_only_on_the_pinned_faust_and_says_which_it_found(monkeypatch):
    rt.check_versions()  # the installed versions are the pinned ones
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    with pytest.raises(rt.UnsupportedFaust, match=r"faust-streaming 0\.15\.3.*found .*0\.16\.0"):
        rt.check_versions()


def test_fault_spec_parses_and_rejects_nonsense_naming_the_variable():
    assert br.Fault.from_env(None) is None and br.Fault.from_env("") is None
    assert br.Fault.from_env("kill:before-commit:2:40") == br.Fault("kill", "before-commit", 2, 40)
    assert br.Fault.from_env("rewind:after-commit:1:7") == br.Fault("rewind", "after-commit", 1, 7)
    assert br.Fault.from_env("enospc:state-write:0:9") == br.Fault("enospc", "state-write", 0, 9)
    assert br.Fault.from_env("drop:fetch:4:12") == br.Fault("drop", "fetch", 4, 12)
    assert br.Fault.from_env("stop:before-commit:1:5") == br.Fault("stop", "before-commit", 1, 5)
    bad_specs = (
        "kill",
        "explode:mid-batch:0:1",
        "raise:sometime:0:1",
        "raise:mid-batch:x:1",
        "rewind:mid-batch:0:1",
        "enospc:mid-batch:0:1",
        "kill:state-write:0:1",
        "drop:mid-batch:0:1",
        "kill:fetch:0:1",
        "stop:state-write:0:1",
    )
    for bad in bad_specs:
        with pytest.raises(ValueError, match="FLASHSALE_FAULT"):
            br.Fault.from_env(bad)


def test_after_commit_fault_rearms_for_the_first_batch_after_the_commit(monkeypatch):
    monkeypatch.setenv("FLASHSALE_FAULT", "kill:after-commit:3:100")
    runtime = br.BatchRuntime("cmds", lambda *a: None)
    runtime.after_commit({br.TP("cmds", 3): 90})  # does not cover offset 100 yet
    assert runtime.fault == br.Fault("kill", "after-commit", 3, 100)
    runtime.after_commit({br.TP("cmds", 3): 150})
    assert runtime.fault == br.Fault("kill", "mid-batch", 3, 150, "after-commit", 100)


def test_a_rewind_fires_once_and_names_the_configured_offset_to_seek_back_to(monkeypatch):
    monkeypatch.setenv("FLASHSALE_FAULT", "rewind:after-commit:3:100")
    runtime = br.BatchRuntime("cmds", lambda *a: None)
    runtime.after_commit({br.TP("cmds", 3): 150})
    assert runtime.maybe_fault("mid-batch", 3, 140, 149) is None  # not the batch after it
    assert runtime.maybe_fault("mid-batch", 3, 150, 180) == 100
    assert runtime.fault is None and runtime.maybe_fault("mid-batch", 3, 181, 190) is None


def test_a_batch_past_the_next_offset_is_sought_back_once_then_stale_then_missing():
    sb, tp = br.SeekBacks(), br.TP("cmds", 2)
    assert sb.verdict(tp, 100, 100, 0) == "decide"  # no gap
    assert sb.verdict(tp, 90, 100, 0) == "decide"  # redelivered: the caller leaves it out
    assert sb.verdict(tp, 561, 114, 0) == "seek"  # records 114..560 would be skipped
    sb.sought(tp, 114, 1)
    assert sb.verdict(tp, 700, 114, 0) == "stale"  # fetched before the seek took effect
    assert sb.verdict(tp, 114, 114, 0) == "decide"  # the records, whenever fetched
    assert sb.verdict(tp, 561, 114, 1) == "missing"  # fetched after the seek: not there
    assert sb.verdict(tp, 900, 561, 1) == "seek"  # a later gap is sought back again
    assert sb.verdict(br.TP("cmds", 3), 561, 114, 1) == "seek"  # per partition
    sb.forget(tp)
    assert sb.verdict(tp, 561, 114, 1) == "seek"  # revoked: forgotten


def test_a_drop_fault_loses_the_fetched_batch_holding_its_offset_once(monkeypatch):
    monkeypatch.setenv("FLASHSALE_FAULT", "drop:fetch:3:120")
    runtime = br.BatchRuntime("cmds", lambda *a: None)
    assert not runtime.lost_in_fetch(br.TP("cmds", 3), 100, 109)
    assert not runtime.lost_in_fetch(br.TP("cmds", 2), 100, 149)  # another partition
    assert runtime.lost_in_fetch(br.TP("cmds", 3), 100, 149)
    assert runtime.fault is None and not runtime.lost_in_fetch(br.TP("cmds", 3), 100, 149)


def test_records_delivered_again_below_the_processed_offset_are_left_out():
    from types import SimpleNamespace

    from processors.app import redelivered_left_out

    records = [SimpleNamespace(offset=o) for o in (10, 11, 13, 14)]  # 12: a control record
    assert [r.offset for r in redelivered_left_out(0, records, 13)] == [13, 14]
    assert redelivered_left_out(0, records, 15) == []


def test_an_error_faust_recovery_would_swallow_exits_the_worker(monkeypatch):
    from faust.tables import recovery

    crashes: list[str] = []
    runtime = br.BatchRuntime("cmds", lambda *a: None)
    monkeypatch.setattr(runtime, "crash", lambda reason, *a: crashes.append(reason))
    import mode

    for owner, name in ((recovery, "logger"), (recovery, "asyncio"), (mode.Service, "crash")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # install's patches, undone after
    rt.install(faust.App("t-recovery-logger"), runtime)
    recovery.logger.warning("Highwater for changelog is ahead")  # other warnings pass through
    assert crashes == []
    recovery.logger.warning("Error in recovery RocksDB write failed")
    assert crashes == ["changelog recovery failed: Error in recovery RocksDB write failed"]

    # Faust's own race: its idle-turn aborted-transaction check iterates a dict a rebalance
    # changes. Raised through a function of that name in Faust's recovery module, it is excused.
    race = "def detect_aborted_tx():\n    d = {1: 2}\n    for k in d: d[k + 1] = 0"

    def swallowed_by_faust(source: str, call: str, filename: str = recovery.__file__) -> None:
        scope: dict[str, Any] = {}
        exec(compile(source, filename, "exec"), scope)
        try:
            scope[call]()
        except Exception as ex:
            recovery.logger.warning(f"Error in recovery {ex}")

    crashes.clear()
    swallowed_by_faust(race, "detect_aborted_tx")
    assert crashes == [] and len(recovery.logger.excused) == 1
    other = race.replace("detect_aborted_tx", "on_changelog_event")
    swallowed_by_faust(other, "on_changelog_event")  # applying a record: never excused
    swallowed_by_faust(race, "detect_aborted_tx", "our_module.py")  # not Faust's function
    swallowed_by_faust(
        "def detect_aborted_tx():\n    raise TimeoutError('position')", "detect_aborted_tx"
    )  # another error of the check: not excused
    assert len(crashes) == 3 and len(recovery.logger.excused) == 1
    for _ in range(recovery.logger.EXCUSED_MAX - 1):
        swallowed_by_faust(race, "detect_aborted_tx")
    assert len(crashes) == 3
    swallowed_by_faust(race, "detect_aborted_tx")  # the 21st within a minute: exit
    assert len(crashes) == 4


def test_a_full_disk_fault_raises_enospc_at_the_state_write(monkeypatch):
    import errno

    monkeypatch.setenv("FLASHSALE_FAULT", "enospc:state-write:2:50")
    runtime = br.BatchRuntime("cmds", lambda *a: None)
    assert runtime.maybe_fault("state-write", 2, 0, 49) is None
    with pytest.raises(OSError) as raised:
        runtime.maybe_fault("state-write", 2, 40, 60)
    assert raised.value.errno == errno.ENOSPC


def test_projection_fault_spec_is_a_batch_count_or_refused_by_name():
    from projections.runner import _fault_batches

    assert _fault_batches(None) is None and _fault_batches("") is None
    assert _fault_batches("3") == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(ValueError, match="FLASHSALE_PROJECTION_FAULT"):
            _fault_batches(bad)


def test_offsets_reach_the_transaction_keyed_by_aiokafka_topic_partitions():
    """A commit as a rebalance begins names partitions by Faust's TP (from our processed
    offsets); aiokafka refuses any key but its own TopicPartition (a crash on scale-out)."""
    import asyncio
    from types import SimpleNamespace

    import aiokafka

    sent: dict = {}

    class Txn:
        async def send_offsets_to_transaction(self, offsets, group):
            for tp in offsets:  # what aiokafka checks
                assert isinstance(tp, aiokafka.TopicPartition), type(tp)
            sent.update(offsets)

        async def commit_transaction(self):
            pass

        async def begin_transaction(self):
            pass

    manager = object.__new__(rt.GatedTransactionManager)
    producer = SimpleNamespace(
        _transaction_producers={"t": Txn()}, _trn_locks={"t": asyncio.Lock()}
    )
    manager.__dict__.update(producer=producer, app=SimpleNamespace(conf=SimpleNamespace(id="g")))
    asyncio.run(manager._commit_one("t", {br.TP("cmds", 2): 40}, begin_next=True))
    assert sent == {aiokafka.TopicPartition("cmds", 2): 40}


def test_a_changelog_end_not_fetched_yet_is_asked_of_the_broker_not_taken_as_minus_one():
    """Right after an assignment aiokafka knows no last stable offset for a changelog partition
    (None), which Faust's recovery read as "the changelog ends at -1"."""
    import asyncio
    from types import SimpleNamespace

    from faust.types import TP

    fetched, fresh = TP("t-changelog", 0), TP("t-changelog", 1)
    asked: list[list[TP]] = []

    async def end_offsets(tps: list[TP]) -> dict[TP, int]:
        asked.append(tps)
        return {tp: 7 for tp in tps}

    aiokafka_consumer = SimpleNamespace(
        last_stable_offset={fetched: 5, fresh: None}.get, end_offsets=end_offsets
    )
    thread = rt.BatchConsumerThread.__new__(rt.BatchConsumerThread)
    thread.consumer = SimpleNamespace(in_transaction=True)  # type: ignore[assignment]
    thread._consumer = aiokafka_consumer  # type: ignore[assignment]
    ends = asyncio.run(thread._highwaters([fetched, fresh]))
    assert ends == {fetched: 5, fresh: 7} and asked == [[fresh]]


def test_a_batch_fetched_again_after_a_seek_back_passes_fausts_read_offset_filter():
    """Faust's fetch loop drops a message whose offset is below the partition's read offset,
    and sets that offset from each message after handing it on. An old batch (up to 560) handed
    on after a seek back to 114 left it at 560: the batch fetched again (114..300) was dropped
    unseen. Batches clear it as they are yielded; the loop's own filter then lets them through."""
    import asyncio
    from types import SimpleNamespace

    tp = br.TP("cmds", 3)
    runtime = br.BatchRuntime("cmds", lambda *a: None)
    recs = [SimpleNamespace(offset=o, timestamp=0, timestamp_type=0) for o in range(114, 301)]

    async def wait_next(timeout: float) -> tuple[dict, set]:
        return {tp: recs}, {tp}

    consumer = SimpleNamespace(
        _wait_next_records=wait_next, should_stop=False, flow_active=True,
        app=SimpleNamespace(consumer_generation_id=4, flashsale_runtime=runtime),
        _buffered_partitions=set(), _read_offset={tp: 560}, seek_epoch=2,
    )  # fmt: skip
    consumer._batch_message = lambda *a: rt.BatchConsumer._batch_message(consumer, *a)

    async def drain() -> list[rt.BatchMessage]:
        handed_on = []
        async for got_tp, msg in rt.BatchConsumer.getmany(consumer, 1.0):
            r_offset = consumer._read_offset[got_tp]  # Faust's _drain_messages, as it reads it
            if r_offset is None or msg.offset >= r_offset:
                handed_on.append(msg)
                consumer._read_offset[got_tp] = msg.offset
        return handed_on

    [msg] = asyncio.run(drain())
    assert (msg.records[0].offset, msg.offset, msg.fetch_epoch) == (114, 300, 2)
