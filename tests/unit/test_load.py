"""The load generator's plan and figures, and the Redis baseline's reply parser (pure)."""

from __future__ import annotations

import pytest

from flashsale.baselines.redis_lua import replies
from producers.load import Plan, Tally, percentiles, summary


def test_a_seed_fixes_who_sends_when_and_another_seed_changes_it():
    a = Plan.make(7, 500, 4, 0, 1000, ["x", "y"])
    assert a == Plan.make(7, 500, 4, 0, 1000, ["x", "y"])
    b = Plan.make(8, 500, 4, 0, 1000, ["x", "y"])
    assert a.at != b.at and a.users != b.users
    assert set(a.skus) == {"x", "y"} and all(0 <= u < 1000 for u in a.users)


def test_poisson_arrivals_average_the_rate_and_uniform_ones_are_even():
    p = Plan.make(3, 1000, 20, 0, 10, ["x"])
    assert len(p.at) == 20_000 and p.at == sorted(p.at)
    assert p.at[-1] == pytest.approx(20, rel=0.03)  # 20,000 gaps of mean 1 ms
    gaps = [b - a for a, b in zip(p.at, p.at[1:], strict=False)]
    assert max(gaps) > 5 * min(gaps)  # exponential gaps, not even ones
    u = Plan.make(3, 1000, 2, 0, 10, ["x"], arrival="uniform")
    assert u.at[:3] == [0.0, 0.001, 0.002] and len(u.at) == 2000


def test_a_burst_sends_everything_at_once():
    plan = Plan.make(1, 1, 1, 250, 10, ["x"])
    assert plan.at == [0.0] * 250 and len(plan.users) == 250


def test_percentiles_are_nearest_rank_in_ms():
    seconds = [i / 1000 for i in range(1, 1001)]  # 1 .. 1000 ms
    assert percentiles(seconds) == {"latency_ms_p50": 500.0, "latency_ms_p99": 990.0,
                                    "latency_ms_p999": 999.0}  # fmt: skip
    assert percentiles([0.002]) == dict.fromkeys(("latency_ms_p50", "latency_ms_p99",
                                                  "latency_ms_p999"), 2.0)  # fmt: skip
    assert percentiles([])["latency_ms_p99"] is None


def test_summary_counts_only_the_successful_outcome_as_answered():
    plan = Plan.make(1, 100, 1, 0, 10, ["x"], arrival="uniform")
    tally = Tally(sent=100, latencies=[0.01] * 90)
    tally.outcomes.update({"202": 90, "429": 10})
    s = summary(plan, tally, 2.0, 0.05, "202")
    assert s["answered_ok_per_s"] == 45 and s["outcomes"] == {"202": 90, "429": 10}
    assert s["loadgen_cpu_us_per_request"] == 500.0 and s["latency_ms_p99"] == 10.0


def test_resp_replies_are_taken_whole_and_a_partial_one_is_left():
    buf = bytearray(b"$8\r\nACCEPTED\r\n-ERR no\r\n:3\r\n$-1\r\n$8\r\nSOLD")
    got, used = replies(buf)
    assert got == [b"ACCEPTED", b"-ERR no", b":3", b""]
    assert buf[used:] == b"$8\r\nSOLD"
    rest = buf[used:] + b"_OUT\r\n"
    assert replies(rest) == ([b"SOLD_OUT"], len(rest))
    with pytest.raises(ValueError, match="unexpected RESP"):
        replies(bytearray(b"*2\r\n"))


def test_http_run_is_open_loop_a_slow_server_cannot_hold_the_sends_back():
    """A server that answers after 0.2 s on 2 connections (10 answers/s) offered 40/s: the
    sends stay on schedule and the queueing shows in the latencies, from the scheduled time."""
    import asyncio

    from producers.load import http_run

    async def main() -> Tally:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = 0
            while await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(28)  # the JSON body of every request here
                await asyncio.sleep(0.2)
                n += 1
                body = b'{"intent_id": "i%d-%d"}' % (id(writer), n)
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))  # fmt: skip
                await writer.drain()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        plan = Plan.make(1, 40, 1, 0, 5, ["k1"], arrival="uniform")
        tally = Tally()
        await http_run(f"http://127.0.0.1:{port}", "/p", ["t"] * 5, plan, tally, connections=2)
        server.close()
        return tally

    tally = asyncio.run(main())
    assert tally.sent == 40 and tally.outcomes == {"202": 40}
    assert max(tally.lags) < 0.1  # sent on time though answers took 2 s to drain
    assert min(tally.latencies) >= 0.2 and max(tally.latencies) > 1.5  # the queue is counted
    assert len(tally.scheduled_ms) == 40
