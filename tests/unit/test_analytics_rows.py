"""The analytics projection's pure parts: per-second aggregates, latency buckets, series."""

from __future__ import annotations

import random
from collections import Counter

from projections.analytics_rows import COUNTS, LATENCY_BUCKETS_MS, AnalyticsRows, percentile
from projections.analytics_series import assemble

T0 = 1_800_000_000_000  # epoch ms, on a second boundary


def _intent(i: int, sku: str, at: int) -> tuple[str, dict, int]:
    return ("PurchaseIntent", {"sale_id": "s", "sku": sku, "user_id": f"u{i % 7}",
                               "intent_id": f"i{i}", "quantity": 1}, at)  # fmt: skip


def _decision(name: str, i: int, sku: str, logged: int, at: int, seq: int, **extra) -> tuple:
    record = {"sale_id": "s", "sku": sku, "intent_id": f"i{i}", "user_id": f"u{i % 7}",
              "quantity": 1, "sequence": seq, "decided_at": logged, **extra}  # fmt: skip
    return (name, record, at)


def _log(n: int = 400, seed: int = 7) -> list[tuple[str, dict, int]]:
    """Intents over a few seconds, each decided a random few ms later."""
    rnd = random.Random(seed)
    out: list[tuple[str, dict, int]] = []
    remaining = {"a": 150, "b": 150}
    for i in range(n):
        sku = "ab"[i % 2]
        logged = T0 + i * 10
        out.append(_intent(i, sku, logged))
        at = logged + rnd.choice((0, 1, 3, 40, 700, 30_000))
        if remaining[sku] > 0:
            remaining[sku] -= 1
            pay_by = at + 1000 if i % 3 else 0
            out.append(_decision("IntentAccepted", i, sku, logged, at, i,
                                 remaining=remaining[sku], pay_by=pay_by))  # fmt: skip
        else:
            out.append(_decision("IntentRejected", i, sku, logged, at, i, remaining=0,
                                 reason="SOLD_OUT" if i % 5 else "USER_LIMIT"))  # fmt: skip
    out.append(("OrderPaid", {"sale_id": "s", "sku": "a", "order_id": "o1", "sequence": n,
                              "decided_at": T0, "user_id": "u1"}, T0 + 5))  # fmt: skip
    out.append(("ClockTick", {"partition": 0}, T0))  # no sale: ignored
    return out


def _one_batch(log: list[tuple[str, dict, int]]) -> AnalyticsRows:
    rows = AnalyticsRows()
    for name, record, at in log:
        rows.add(name, record, at)
    return rows


def _merged(batches: list[AnalyticsRows]) -> dict:
    """What the store's upsert makes of batches: counts and buckets added, the remaining of
    the greatest sequence, the greatest queue length."""
    seconds: dict = {}
    for b in batches:
        for key, s in b.seconds.items():
            m = seconds.setdefault(key, {"counts": [0] * len(COUNTS), "reasons": {},
                                         "latency": [0] * (len(LATENCY_BUCKETS_MS) + 1),
                                         "remaining": (-1, None)})  # fmt: skip
            m["counts"] = [x + y for x, y in zip(m["counts"], s.counts, strict=True)]
            m["latency"] = [x + y for x, y in zip(m["latency"], s.latency, strict=True)]
            for r, n in s.reasons.items():
                m["reasons"][r] = m["reasons"].get(r, 0) + n
            if s.remaining_sequence > m["remaining"][0]:
                m["remaining"] = (s.remaining_sequence, s.remaining)
    return seconds


def test_counts_match_the_log_computed_independently():
    log = _log()
    rows = _one_batch(log)
    by_second: dict = {}
    for name, r, at in log:
        if "sale_id" not in r:
            continue
        key = (r["sale_id"], r["sku"], at // 1000)
        c = by_second.setdefault(key, {"received": 0, "accepted": 0, "rejected": 0, "held": 0,
                                       "paid": 0, "latency": 0})  # fmt: skip
        c["received"] += name == "PurchaseIntent"
        c["accepted"] += name == "IntentAccepted"
        c["rejected"] += name == "IntentRejected"
        c["held"] += name == "IntentAccepted" and bool(r.get("pay_by"))
        c["paid"] += name == "OrderPaid"
        c["latency"] += name in ("IntentAccepted", "IntentRejected")
    assert set(rows.seconds) == {k for k, c in by_second.items() if any(c.values())}
    for key, c in by_second.items():
        s = rows.seconds[key]
        got = dict(zip(COUNTS, s.counts, strict=True))
        assert {k: got[k] for k in ("received", "accepted", "rejected", "held", "paid")} == {
            k: c[k] for k in ("received", "accepted", "rejected", "held", "paid")
        }
        assert sum(s.latency) == c["latency"]
    total_reasons: dict = {}
    for s in rows.seconds.values():
        for r, n in s.reasons.items():
            total_reasons[r] = total_reasons.get(r, 0) + n
    rejected = [r for n, r, _ in log if n == "IntentRejected"]
    assert total_reasons == {
        reason: sum(1 for r in rejected if r["reason"] == reason)
        for reason in ("SOLD_OUT", "USER_LIMIT")
    }
    assert rows.users == Counter(
        (r["sale_id"], r["user_id"]) for n, r, _ in log if n == "PurchaseIntent"
    )
    assert len(rows.users) == 7


def test_latency_lands_in_the_bucket_of_its_bound():
    rows = AnalyticsRows()
    waits = [0, 1, 2, 3, 10, 11, 10_000, 10_001, 99_999]
    for i, w in enumerate(waits):
        record = {"sale_id": "s", "sku": "a", "reason": "SOLD_OUT", "sequence": i,
                  "decided_at": T0 + 100_000 - w, "remaining": 0}  # fmt: skip
        rows.add("IntentRejected", record, T0 + 100_000)  # one second, waits of w ms
    [second] = rows.seconds.values()
    expected = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for w in waits:
        expected[next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if w <= b), -1)] += 1
    assert second.latency == expected
    assert second.latency[0] == 2 and second.latency[-1] == 2  # <= 1 ms; above 10 s


def test_any_split_into_batches_adds_up_to_the_whole():
    log = _log(600, seed=3)
    whole = _merged([_one_batch(log)])
    rnd = random.Random(11)
    for _ in range(20):
        cuts = sorted(rnd.sample(range(1, len(log)), rnd.randint(1, 30)))
        parts = [log[a:b] for a, b in zip([0, *cuts], [*cuts, len(log)], strict=True)]
        rnd.shuffle(parts)  # batches of different partitions arrive in any order
        assert _merged([_one_batch(p) for p in parts]) == whole


def test_percentile_interpolates_within_a_bucket():
    buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    assert percentile(buckets, 0.5) is None
    buckets[3] = 10  # all in (5, 10] ms
    assert percentile(buckets, 0.5) == 7.5
    assert percentile(buckets, 1.0) == 10
    buckets[-1] = 10  # half above the last bound
    assert percentile(buckets, 0.99) > LATENCY_BUCKETS_MS[-1]


def test_series_fills_quiet_seconds_and_carries_stock_forward():
    rows = {
        # 104: projected after the span was read (a live sale): outside the window, left out
        "seconds": [(100, 8, 4, 3, 0, 0), (103, 1, 0, 1, 5, 2), (104, 9, 9, 0, 0, 0)],
        "latency": [(100, 3, 4), (100, 14, 1), (103, 1, 1)],
        "stock": [("a", 100, 6), ("a", 103, 0), ("a", 104, 0)],
        "stock_before": [("b", 4)],
        "totals": [("a", 6, 4, 1, 5, 2, 0, 0, 2, 0, 0, 0), ("b", 3, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4)],
        "reasons": [("a", "USER_LIMIT", 1), ("b", "SOLD_OUT", 3)],
        "latency_totals": [("a", 3, 4), ("b", 1, 1)],
    }
    s = assemble("sale", {"a": 10, "b": 5, "c": 7}, 100, 103, ["a", "b", "c"], rows)
    assert s["t"] == [100, 101, 102, 103]
    assert s["received"] == [8, 0, 0, 1]
    assert s["decided"] == [7, 0, 0, 1]
    assert s["queued"] == [0, 0, 0, 5] and s["drawn"] == [0, 0, 0, 2]  # running totals
    # Stock carries forward: from the last value before the window, else the allocation.
    assert s["remaining"] == {"a": [6, 6, 6, 0], "b": [4, 4, 4, 4], "c": [7, 7, 7, 7]}
    assert s["p50_ms"][1] is None and 2 < s["p50_ms"][0] <= 5  # 4 of 5 in (2, 5] ms
    assert s["p99_ms"][0] > LATENCY_BUCKETS_MS[-1]  # one in the overflow bucket
    totals = s["totals"]
    assert totals["a"]["rejected_by_reason"] == {"USER_LIMIT": 1}
    assert [totals[k]["remaining"] for k in "abc"] == [0, 4, 7]
    assert totals["a"]["decided"] == 5 and totals["c"]["received"] == 0
    assert assemble("none", {"a": 3}, None, None, ["a"], {k: [] for k in rows})["t"] == []
