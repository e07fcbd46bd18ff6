"""The autoscaler's policy: thresholds, hysteresis (sustain, cooldown, the gap between the
marks) and bounds."""

from __future__ import annotations

import pytest

from flashsale.scrape import Scrape
from infra.autoscale import complete, measure
from infra.autoscale_policy import Autoscaler, Bounds, Policy, Sample

POLICY = Policy(servers=Bounds(1, 3), workers=Bounds(1, 2), sustain=3, cooldown_s=10)


def sample(at: float, servers: int = 1, workers: int = 1, cpu: float = 0.5, rps: float = 300,
           lag: int = 1000, idle: float = 1.0) -> Sample:  # fmt: skip
    return Sample(at, servers, workers, cpu, rps, lag, idle)


def test_a_server_is_added_only_after_the_load_held_for_sustain_samples():
    scaler = Autoscaler(POLICY)
    assert scaler.decide(sample(0, cpu=0.9)) == []
    assert scaler.decide(sample(1, cpu=0.9)) == []
    [d] = scaler.decide(sample(2, cpu=0.9))
    assert (d.kind, d.step, d.to) == ("servers", 1, 2) and "cpu 0.90" in d.reason


def test_a_dip_resets_the_streak():
    scaler = Autoscaler(POLICY)
    for at, cpu in enumerate((0.9, 0.9, 0.5, 0.9, 0.9)):
        assert scaler.decide(sample(at, cpu=cpu)) == []


def test_the_request_rate_alone_adds_a_server_per_server_counted():
    scaler = Autoscaler(POLICY)
    # 1,400 req/s over 2 servers is 700 each: above 600.
    decided = [scaler.decide(sample(at, servers=2, cpu=0.3, rps=1400)) for at in range(3)]
    assert [d.to for d in decided[-1]] == [3]
    # The same over 3 servers is 467 each: nothing.
    scaler = Autoscaler(POLICY)
    assert all(scaler.decide(sample(at, servers=3, cpu=0.3, rps=1400)) == [] for at in range(5))


def test_between_the_marks_nothing_changes_either_way():
    scaler = Autoscaler(POLICY)
    for at in range(20):  # cpu between 0.2 and 0.7, rps between 100 and 600, lag in the band
        assert scaler.decide(sample(at, servers=2, workers=2, cpu=0.45, rps=700, lag=1000)) == []


def test_removal_needs_both_cpu_and_rate_low():
    scaler = Autoscaler(POLICY)
    for at in range(5):  # idle CPU but many cheap requests: kept
        assert scaler.decide(sample(at, servers=2, cpu=0.1, rps=500)) == []
    scaler = Autoscaler(POLICY)
    decided = [scaler.decide(sample(at, servers=2, cpu=0.1, rps=50)) for at in range(3)]
    assert [(d.step, d.to) for d in decided[-1]] == [(-1, 1)]


def test_the_cooldown_holds_the_next_change_of_that_kind_only():
    scaler = Autoscaler(POLICY)
    for at in range(3):
        decided = scaler.decide(sample(at, cpu=0.9, lag=9000))
    assert sorted(d.kind for d in decided) == ["servers", "workers"]
    scaler.changed("servers", 2)
    held = [scaler.decide(sample(at, servers=2, workers=1, cpu=0.9, lag=9000))
            for at in range(3, 12)]  # fmt: skip
    assert all(d.kind == "workers" for ds in held for d in ds)  # workers were never changed
    [d] = [d for d in scaler.decide(sample(12, servers=2, cpu=0.9, lag=0)) if d.kind == "servers"]
    assert d.to == 3  # 10 s after the change, the load still high


def test_bounds_are_hard():
    scaler = Autoscaler(POLICY)
    for at in range(10):  # at the maximum: never more
        assert scaler.decide(sample(at, servers=3, workers=2, cpu=0.99, rps=5000, lag=10**6)) == []
    scaler = Autoscaler(POLICY)
    for at in range(10):  # at the minimum: never fewer
        assert scaler.decide(sample(at, servers=1, workers=1, cpu=0.0, rps=0, lag=0)) == []
    [d] = Autoscaler(POLICY).decide(sample(0, servers=0, cpu=0.0, rps=0, lag=500))
    assert (d.kind, d.to) == ("servers", 1) and "minimum" in d.reason  # one exited: at once


def test_nothing_is_added_on_a_host_without_an_idle_core():
    scaler = Autoscaler(POLICY)
    for at in range(6):  # load high on both counts, the host saturated
        assert scaler.decide(sample(at, cpu=0.9, rps=3000, lag=10**6, idle=0.3)) == []
    decided = scaler.decide(sample(6, cpu=0.9, rps=3000, lag=10**6, idle=0.6))
    assert decided == []  # a streak starts again once there is room: sustain counts anew
    decided = [scaler.decide(sample(at, cpu=0.9, rps=3000, lag=10**6, idle=0.6))
               for at in (7, 8)][-1]  # fmt: skip
    assert sorted(d.kind for d in decided) == ["servers", "workers"]
    scaler = Autoscaler(POLICY)  # removal needs no room
    decided = [scaler.decide(sample(at, servers=2, cpu=0.1, rps=50, idle=0.0)) for at in range(3)]
    assert [d.to for d in decided[-1]] == [1]


def test_an_incomplete_sample_may_add_but_never_remove():
    scaler = Autoscaler(POLICY)
    for at in range(5):  # a server's /metrics timed out: its zeros look idle
        assert scaler.decide(sample(at, servers=2, workers=2, cpu=0.0, rps=0, lag=0), False) == []
    decided = [scaler.decide(sample(at, cpu=0.9), False) for at in range(5, 8)][-1]
    assert [(d.kind, d.step) for d in decided] == [("servers", 1)]


def test_a_policy_without_hysteresis_is_refused():
    with pytest.raises(ValueError, match="below its high mark"):
        Policy(cpu_low=0.8, cpu_high=0.7)
    with pytest.raises(ValueError, match="min <= max"):
        Bounds(3, 2)


def _scrape(kind: str, pid: int, at: float, cpu: float, requests: float, lag: float = 0,
            error: str | None = None) -> Scrape:  # fmt: skip
    s = Scrape(f"{kind}:{pid}", kind, pid, "http://x/metrics", at=at, error=error)
    s.samples = {("process_cpu_seconds_total", ()): cpu,
                 ("flashsale_http_requests_total", (("route", "r"),)): requests,
                 ("flashsale_consumer_lag", (("partition", "0"),)): lag}  # fmt: skip
    return s


def test_a_sample_is_measured_from_two_scrapes_and_a_missing_one_is_not_a_zero():
    before = [_scrape("app", 1, 10.0, 5.0, 1000), _scrape("app", 2, 10.0, 7.0, 2000),
              _scrape("processor", 3, 10.0, 1.0, 0, lag=10)]  # fmt: skip
    now = [_scrape("app", 1, 12.0, 6.0, 2000), _scrape("app", 2, 12.0, 7.4, 2600),
           _scrape("processor", 3, 12.0, 2.0, 0, lag=7000)]  # fmt: skip
    was = {s.key: s for s in before}
    s = measure(now, was, 12.0, 2, 1, 0.9)
    assert (s.servers, s.workers, s.lag, s.host_idle) == (2, 1, 7000, 0.9)
    assert s.server_cpu == pytest.approx((0.5 + 0.2) / 2) and s.requests_per_s == 800
    assert complete(now, was)
    slow = [*now[:1], _scrape("app", 2, 12.0, 0, 0, error="timed out"), now[2]]
    assert not complete(slow, was)  # a saturated server answering late: no decision
    assert not complete([*now, _scrape("app", 4, 12.0, 0, 0)], was)  # new: no rate yet
