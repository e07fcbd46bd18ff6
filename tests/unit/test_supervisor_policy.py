"""The supervisor's restart rules: backoff, its reset, and the stop on a crash loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashsale.settings import SettingError
from infra.restart_policy import CrashRecord, Exit, RestartPolicy, SupervisorConfig
from infra.supervisor import prometheus_text, record_crash, take_crash


def crash(partition: int, offset: int) -> CrashRecord:
    return CrashRecord(partition, offset, "boom", 0)


def test_backoff_doubles_from_the_base_and_stops_growing_at_the_cap():
    policy = RestartPolicy(base_s=0.5, max_s=30, healthy_s=30, crash_limit=5)
    delays = [policy.on_exit(Exit(1, 0.1)).delay_s for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.restarts == 9


def test_a_healthy_run_resets_the_backoff():
    policy = RestartPolicy(base_s=0.5, max_s=30, healthy_s=30, crash_limit=5)
    for _ in range(4):
        policy.on_exit(Exit(1, 0.1))
    assert policy.on_exit(Exit(-9, 31.0)).delay_s == 0.5
    assert policy.on_exit(Exit(1, 0.1)).delay_s == 1


def test_kill_9_without_a_record_is_restarted_for_ever():
    policy = RestartPolicy(base_s=0.5, max_s=2, healthy_s=30, crash_limit=2)
    verdicts = [policy.on_exit(Exit(-9, 0.2)) for _ in range(50)]
    assert all(v.restart for v in verdicts)
    assert policy.restarts == 50


def test_the_same_offset_crash_limit_times_in_a_row_is_a_crash_loop():
    policy = RestartPolicy(crash_limit=3)
    first, second = (policy.on_exit(Exit(70, 0.5, crash(2, 41))) for _ in range(2))
    assert first.restart and first.repeats == 1
    assert second.restart and second.repeats == 2
    third = policy.on_exit(Exit(70, 0.5, crash(2, 41)))
    assert third.crash_loop and third.repeats == 3 and third.crash == crash(2, 41)
    assert policy.restarts == 2, "the crash loop is not a restart"


def test_a_different_offset_or_an_exit_without_a_record_starts_the_count_again():
    policy = RestartPolicy(crash_limit=3)
    exits = [crash(0, 7), crash(0, 7), crash(0, 8), crash(0, 8), None, crash(0, 8), crash(1, 8)]
    verdicts = [policy.on_exit(Exit(70, 0.5, c)) for c in exits]
    assert all(v.restart for v in verdicts)
    assert [v.repeats for v in verdicts] == [1, 2, 1, 2, 0, 1, 1]


def test_a_crash_loop_does_not_need_fast_crashes():
    policy = RestartPolicy(healthy_s=30, crash_limit=2)
    policy.on_exit(Exit(70, 120.0, crash(3, 9)))
    assert policy.on_exit(Exit(70, 120.0, crash(3, 9))).crash_loop


def test_invalid_policy_is_refused():
    with pytest.raises(ValueError):
        RestartPolicy(base_s=2, max_s=1)
    with pytest.raises(ValueError):
        RestartPolicy(crash_limit=0)


exits = st.lists(
    st.builds(
        Exit,
        code=st.sampled_from([-9, -15, 0, 1, 70]),
        ran_s=st.sampled_from([0.1, 5.0, 30.0, 100.0]),
        crash=st.none() | st.builds(crash, st.integers(0, 1), st.integers(0, 2)),
    ),
    max_size=40,
)


@given(exits=exits, limit=st.integers(1, 4))
def test_policy_matches_a_reference_model(exits: list[Exit], limit: int):
    base, cap, healthy = 0.5, 4.0, 30.0
    policy = RestartPolicy(base, cap, healthy, limit)
    failures = 0
    for i, exit in enumerate(exits):
        verdict = policy.on_exit(exit)
        window = exits[max(0, i - limit + 1) : i + 1]
        positions = {e.crash.position if e.crash else None for e in window}
        looping = len(window) == limit and None not in positions and len(positions) == 1
        assert verdict.crash_loop == looping
        if looping:
            assert policy.restarts == i
            return
        failures = 0 if exit.ran_s >= healthy else failures
        assert verdict.delay_s == min(base * 2**failures, cap)
        failures += 1
    assert policy.restarts == len(exits)


def test_config_defaults_and_invalid_settings_are_named():
    assert SupervisorConfig.from_env({}) == SupervisorConfig(0.5, 30.0, 30.0, 5)
    with pytest.raises(SettingError, match="FLASHSALE_SUPERVISE_CRASH_LIMIT"):
        SupervisorConfig.from_env({"FLASHSALE_SUPERVISE_CRASH_LIMIT": "0"})
    with pytest.raises(SettingError, match="FLASHSALE_SUPERVISE_BACKOFF_MAX_S"):
        SupervisorConfig.from_env(
            {"FLASHSALE_SUPERVISE_BACKOFF_S": "5", "FLASHSALE_SUPERVISE_BACKOFF_MAX_S": "1"}
        )


def test_crash_record_contract_round_trip(tmp_path: Path):
    path = record_crash(tmp_path, "processor", partition=4, offset=1041, reason="bad record")
    assert path == tmp_path / "processor.crash.json"
    data = json.loads(path.read_text())
    assert set(data) == {"partition", "offset", "reason", "at"} and data["at"] > 1.7e12
    record = take_crash(tmp_path, "processor")
    assert record is not None and record.position == (4, 1041) and record.reason == "bad record"
    assert not path.exists(), "the supervisor consumes the record"
    assert take_crash(tmp_path, "processor") is None


def test_an_unreadable_crash_record_counts_as_none(tmp_path: Path):
    (tmp_path / "projector.crash.json").write_text("{not json")
    assert take_crash(tmp_path, "projector") is None
    assert not (tmp_path / "projector.crash.json").exists()


def test_metrics_are_prometheus_text():
    text = prometheus_text(
        {"projector": {"restarts": 3, "pid": None, "crash_loop": True, "state": "crash_loop"}}
    )
    assert 'flashsale_service_restarts_total{service="projector"} 3\n' in text
    assert 'flashsale_service_crash_loop{service="projector"} 1\n' in text
    assert 'flashsale_service_up{service="projector"} 0\n' in text
    assert "# TYPE flashsale_service_restarts_total counter\n" in text
