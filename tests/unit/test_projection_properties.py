"""Property: projecting the same log gives the same tables however it is batched or repeated.

The runner hands a projection batches whose boundaries depend on fetch sizes, partitions
interleave differently on every replay, and a decision may arrive again (a second projection
on the same tables, a log copied with repeats). Folded through the in-memory store (held to
the PostgreSQL store by the contract tests), every such delivery of one sale's log must give
the tables of the plain in-order one, and the counters must equal what the decisions say.
"""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from projections.memory import MemoryOutcomeStore
from projections.rows import BatchRows

T = 1_760_000_000_000
REASONS = ["SOLD_OUT", "USER_LIMIT", "INSUFFICIENT_STOCK"]


@st.composite
def sale_log(draw: st.DrawFn) -> list[tuple[str, dict]]:
    """Per SKU: SaleOpened (sequence 1), decisions with a true remaining, maybe SaleClosed."""
    log: list[tuple[str, dict]] = []
    for sku in draw(st.sets(st.sampled_from("ABCD"), min_size=1)):
        remaining = allocation = draw(st.integers(0, 6))
        opened = {"event_id": f"o-{sku}", "sale_id": "s", "sku": sku, "allocation": allocation,
                  "per_user_limit": 3, "per_order_max": 3, "starts_at": T,
                  "ends_at": T + 1, "rules_version": 1, "sequence": 1,
                  "decided_at": T}  # fmt: skip
        log.append(("SaleOpened", opened))
        seq = 1
        for seq in range(2, draw(st.integers(1, 13)) + 1):
            q = draw(st.integers(1, 3))
            base = {"intent_id": f"{sku}{seq}", "sale_id": "s", "sku": sku, "quantity": q,
                    "user_id": f"u{draw(st.integers(0, 3))}", "sequence": seq,
                    "decided_at": T + seq}  # fmt: skip
            if q <= remaining and draw(st.booleans()):
                remaining -= q
                log.append(("IntentAccepted", {**base, "order_id": f"ord-{sku}{seq}",
                                               "remaining": remaining}))  # fmt: skip
            else:
                reason = draw(st.sampled_from(REASONS))
                log.append(("IntentRejected", {**base, "reason": reason, "detail": "",
                                               "remaining": remaining}))  # fmt: skip
        if draw(st.booleans()):
            log.append(("SaleClosed", {"sale_id": "s", "sku": sku, "remaining": remaining,
                                       "sequence": seq + 1, "decided_at": T + 99}))  # fmt: skip
    return log


def project(batches: list[list[tuple[str, dict]]]) -> MemoryOutcomeStore:
    store = MemoryOutcomeStore()
    for records in batches:
        rows = BatchRows()
        for name, record in records:
            rows.add(name, record)
        store.write(rows)
    return store


@settings(max_examples=300, deadline=None)
@given(sale_log(), st.data())
def test_any_batching_order_and_repeats_give_the_same_tables(
    log: list[tuple[str, dict]], data: st.DataObject
) -> None:
    plain = project([log])
    # Deliver: SKUs (partitions) interleaved, each in its own order; some records repeated
    # (redelivery after a crash); cut into batches anywhere.
    skus = {r["sku"] for _, r in log}
    in_order = {sku: iter([r for r in log if r[1]["sku"] == sku]) for sku in skus}
    delivery = [
        next(in_order[sku]) for sku in data.draw(st.permutations([r["sku"] for _, r in log]))
    ]
    delivery += data.draw(st.lists(st.sampled_from(log), max_size=5)) if log else []
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(delivery) - 1)), max_size=6)))
    edges = [0, *cuts, len(delivery)]
    got = project([delivery[a:b] for a, b in itertools.pairwise(edges)])
    assert got.dump() == plain.dump()

    decisions = [r for name, r in log if name.startswith("Intent")]
    for (_, sku), (won, units, lost, by, remaining, last) in plain.counters.items():
        mine = [d for d in decisions if d["sku"] == sku]
        accepted = [d for d in mine if "order_id" in d]
        opened = next(r["allocation"] for n, r in log if n == "SaleOpened" and r["sku"] == sku)
        assert (won, units, lost) == (len(accepted), sum(d["quantity"] for d in accepted),
                                      len(mine) - len(accepted))  # fmt: skip
        assert by == dict(Counter(d["reason"] for d in mine if "reason" in d))
        events = [r["sequence"] for _, r in log if r["sku"] == sku]
        assert remaining == opened - units and last == max(events) == len(events)
