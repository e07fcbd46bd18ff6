"""The live feed's positions: a stream resumes after its last event id on any server, exactly."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from producers.commands import Appended
from producers.http.errors import ApiError
from producers.http.feedfacts import Fact, parse_position
from producers.http.intake import Receipts
from producers.http.livefeed import DecisionFeed
from producers.http.models import IntentStatus
from producers.http.statuses import status_of_fact
from producers.http.store import status_of
from producers.http.views import IntentViews, Rendered
from projections.rows import utc
from schemas.codec import SchemaRegistry


def decision(p: int, offset: int, user: str, intent: str, accepted: bool = True) -> Fact:
    record: dict[str, Any] = {
        "intent_id": intent, "sale_id": "s", "sku": f"k{p}", "user_id": user, "quantity": 1,
        "remaining": 10 - offset, "sequence": offset, "decided_at": 1_800_000_000_123,
    }  # fmt: skip
    if accepted:
        return Fact(p, offset, "IntentAccepted", {**record, "order_id": f"o-{intent}"})
    return Fact(p, offset, "IntentRejected", {**record, "reason": "SOLD_OUT", "detail": ""})


# The same log on two servers: u's intents a..e on partitions 0 and 1, others' in between.
LOG = [
    decision(0, 0, "u", "a"), decision(1, 0, "v", "x"), decision(1, 1, "u", "b"),
    decision(0, 1, "v", "y"), decision(0, 2, "u", "c", accepted=False), decision(1, 2, "u", "d"),
    decision(1, 3, "v", "z"), decision(0, 3, "u", "e"),
]  # fmt: skip


def feed(window: int = 100) -> DecisionFeed:
    f = DecisionFeed("127.0.0.1:1", "t", SchemaRegistry.load_default(), window)
    f.begin_at([0, 0])
    return f


def drain(stream: Any) -> list[tuple[str, str]]:
    out = []
    while not stream.queue.empty():
        position, fact = stream.queue.get_nowait()
        out.append((position, fact.record["intent_id"]))
    return out


def test_a_stream_resumed_on_another_server_gets_exactly_the_events_after_its_last_id():
    async def scenario() -> None:
        a, b = feed(), feed()
        stream, gap = a.subscribe("u", None)
        assert not gap
        a.apply(LOG[:5])
        seen = drain(stream)
        assert [i for _, i in seen] == ["a", "b", "c"]
        last_id = seen[1][0]  # the client saw a and b, then its server died
        b.apply(LOG)  # the other server has read the whole log
        resumed, gap = b.subscribe("u", last_id)
        assert not gap
        assert sorted(i for _, i in drain(resumed)) == ["c", "d", "e"]  # replayed by partition
        # A server behind the client's position sends nothing twice as it catches up.
        c = feed()
        behind, gap = c.subscribe("u", seen[2][0])
        c.apply(LOG)
        assert sorted(i for _, i in drain(behind)) == ["d", "e"]

    asyncio.run(scenario())


def test_each_id_covers_what_was_sent_so_a_resume_from_any_id_repeats_nothing():
    async def scenario() -> None:
        a = feed()
        stream, _ = a.subscribe("u", None)
        a.apply(LOG)
        sent = drain(stream)
        for k, (position, _) in enumerate(sent):
            b = feed()
            b.apply(LOG)
            again, _ = b.subscribe("u", position)
            assert sorted(i for _, i in drain(again)) == sorted(i for _, i in sent[k + 1 :])
            # The heartbeat's position after everything: nothing is left to resume.
            assert drain(b.subscribe("u", b.position_for(again))[0]) == []

    asyncio.run(scenario())


def test_a_position_older_than_the_window_or_not_a_position_is_a_reset():
    async def scenario() -> None:
        small = feed(window=2)
        small.apply(LOG)
        for bad in ("0.0", "garbage", "1.2.3", ""):
            stream, gap = small.subscribe("u", bad)
            assert gap == (bad != "") and drain(stream) == []
        assert parse_position("4.4", 2) == [4, 4] and parse_position("4", 2) is None

    asyncio.run(scenario())


def test_a_stalled_client_is_ended_and_resumes_without_missing_an_event(monkeypatch):
    monkeypatch.setattr("producers.http.livefeed.QUEUE_MAX", 3)
    users_events = sorted(f.record["intent_id"] for f in LOG if f.record["user_id"] == "u")

    async def scenario() -> None:
        a = feed()
        stream, _ = a.subscribe("u", None)
        a.apply(LOG)
        items = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
        assert items[-1] is None and a.subscribers == 0
        got = [fact.record["intent_id"] for _, fact in items[:-1]]
        # It resumes (here on another server) from the last event it received: the rest
        # arrive, nothing twice, nothing skipped, even when that is more than a queue's worth.
        b = feed()
        b.apply(LOG)
        position = items[-2][0]
        while True:
            again, gap = b.subscribe("u", position)
            assert not gap
            batch = [again.queue.get_nowait() for _ in range(again.queue.qsize())]
            got += [fact.record["intent_id"] for _, fact in (x for x in batch if x is not None)]
            if not batch or batch[-1] is not None:
                break
            position = batch[-2][0]
        assert sorted(got) == users_events

    asyncio.run(scenario())


def test_sale_progress_and_waiting_for_a_sale_fact():
    async def scenario() -> None:
        a = feed()
        opened = a.expect("s", "k0", lambda f: f.record["allocation"] == 7)
        a.apply(LOG[:1])
        assert not opened.done()
        other = Fact(0, 4, "SaleOpened", {"sale_id": "s", "sku": "k0", "allocation": 6})
        fact = Fact(0, 5, "SaleOpened", {"sale_id": "s", "sku": "k0", "allocation": 7})
        a.apply([other, fact])  # someone else's opening is not the answer; the next one is
        assert opened.result() == fact
        assert a.sale_progress("s").remaining == {"k0": 7}  # type: ignore[union-attr]
        a.apply(LOG[1:3])
        assert a.sale_progress("s").remaining == {"k0": 7, "k1": 9}  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_a_pushed_status_is_the_api_status():
    accepted, rejected = status_of_fact(LOG[0]), status_of_fact(LOG[4])
    assert accepted["status"] == "accepted" and accepted["order_id"] == "o-a"
    assert rejected["status"] == "rejected" and rejected["reason"] == "SOLD_OUT"
    assert rejected["detail"] is None and accepted["decided_at"].isoformat().endswith(
        ".123000+00:00"
    )


def test_a_decision_in_the_window_answers_a_status_read_as_the_projection_would():
    async def scenario() -> None:
        a = feed(window=3)
        a.apply(LOG[:1])
        sales = _Rows()
        views = IntentViews(sales, Receipts("s" * 48), decisions=a.decision)
        from_feed = await views.get("u", "a", None)
        assert sales.queries == 0  # decided and read by this server: no query
        # The same decision projected gives the same answer, byte for byte (and ETag).
        row = {**LOG[0].record, "outcome": "accepted", "reason": None, "detail": "",
               "decided_at": utc(LOG[0].record["decided_at"])}  # fmt: skip
        projected = Rendered.of(IntentStatus.model_validate(status_of(row)), "x")
        assert from_feed.body == projected.body and from_feed.etag == projected.etag
        a.apply(LOG[1:])  # "a" leaves the window; its answer stays (final, kept)
        assert a.decision("a") is None and a.decision("e") is not None
        assert (await views.get("u", "a", None)).body == from_feed.body

    asyncio.run(scenario())


class _Rows:
    def __init__(self) -> None:
        self.queries = 0

    async def intent_status(self, intent_id: str) -> dict[str, Any] | None:
        self.queries += 1
        return None


def at(p: int, offset: int, decided_at: int) -> Fact:
    f = decision(p, offset, "v", f"i{p}-{offset}")
    return Fact(p, offset, f.name, {**f.record, "decided_at": decided_at})


def test_the_feed_says_undecided_only_when_the_writer_surely_has_not_reached_the_intent():
    now = int(time.time() * 1000)

    async def scenario() -> None:
        from_start = DecisionFeed("127.0.0.1:1", "t", SchemaRegistry.load_default(), 100)
        from_start.begin_at([0, 0], lows=[0, 0], highs=[0, 0])
        assert from_start.undecided(0, now) and from_start.undecided(1, now)  # nothing decided
        from_start.apply([at(0, 0, now - 10)])
        assert from_start.undecided(0, now - 9)  # the writer decided up to now - 10
        assert not from_start.undecided(0, now - 10)  # same millisecond: maybe decided
        assert not from_start.undecided(0, now - 500)  # it passed that intent
        assert from_start.undecided(1, now - 500)  # partitions are independent writers
        assert not from_start.undecided(2, now)  # no such partition
        assert not from_start.undecided(1, now - 120_000)  # too old to trust the feed

        # Started mid-log: unsure until it has read what the log held at its start.
        mid = DecisionFeed("127.0.0.1:1", "t", SchemaRegistry.load_default(), 100)
        mid.begin_at([5, 5], lows=[0, 0], highs=[8, 5])
        assert not mid.undecided(0, now) and not mid.undecided(1, now)  # nothing read yet
        mid.apply([at(0, 5, now - 30), at(0, 6, now - 20)])
        assert not mid.undecided(0, now)  # offset 7 (maybe a later decision) not read yet
        mid.apply([at(0, 7, now - 15)])
        assert mid.undecided(0, now - 14) and not mid.undecided(0, now - 16)
        assert not mid.undecided(1, now)  # read through its start, but no decision seen

    asyncio.run(scenario())


def test_a_queued_intent_the_writer_has_not_reached_is_answered_without_a_query():
    now = int(time.time() * 1000)

    async def scenario() -> None:
        f = DecisionFeed("127.0.0.1:1", "t", SchemaRegistry.load_default(), 100)
        f.begin_at([0], lows=[0], highs=[0])
        f.apply([at(0, 0, now - 10)])
        receipts, rows = Receipts("s" * 48), _Rows()
        views = IntentViews(rows, receipts, decisions=f.decision, undecided=f.undecided)
        ahead = receipts.sign("q", "u", "s", "k0", 1, Appended(0, 9, now - 5))
        answer = await views.get("u", "q", ("s", "k0", 1, ahead))
        assert b'"queued"' in answer.body and rows.queries == 0
        # Behind what the writer decided (a repeat it ignored, say): the projection is asked.
        behind = receipts.sign("r", "u", "s", "k0", 1, Appended(0, 1, now - 50))
        answer = await views.get("u", "r", ("s", "k0", 1, behind))
        assert b'"queued"' in answer.body and rows.queries == 1
        # A position the edge did not sign proves nothing: unknown intent.
        mac = ahead.split(".")[0]
        with pytest.raises(ApiError) as refused:
            await views.get("u", "q", ("s", "k0", 1, f"{mac}.0.{now}"))
        assert refused.value.status == 404

    asyncio.run(scenario())


def test_a_partition_read_to_its_end_is_trusted_and_a_silent_reader_is_not():
    now = int(time.time() * 1000)

    async def scenario() -> None:
        f = DecisionFeed("127.0.0.1:1", "t", SchemaRegistry.load_default(), 100)
        # The end offset at start (8) is past a transaction's commit marker, which a
        # read_committed consumer never delivers: offset 7 is never applied.
        f.begin_at([5], lows=[0], highs=[8])
        f.apply([at(0, 5, now - 30), at(0, 6, now - 20)])
        assert not f.undecided(0, now)
        assert not f.read_to([8])
        f._apply([], [(0, 8)])  # the reader reached the partition's end, at offset 8
        assert f.undecided(0, now) and not f.undecided(0, now - 25)
        assert f.read_to([8]) and not f.read_to([9])
        f._heard = time.monotonic() - 60  # the reader thread died or hangs
        assert not f.undecided(0, now)

    asyncio.run(scenario())


def test_a_resume_finds_the_users_decisions_in_the_window_by_their_kept_user_id():
    async def scenario() -> None:
        f = feed(window=3)
        f.apply(LOG)  # partition 0 keeps y, c, e; partition 1 keeps b, d, z
        stream, gap = f.subscribe("u", "1.1")  # the window starts at offset 1 of each
        assert not gap and sorted(i for _, i in drain(stream)) == ["b", "c", "d", "e"]
        assert f.decision("a") is None and f.decision("x") is None  # evicted from the index

    asyncio.run(scenario())


def queued(p: int, offset: int, user: str, intent: str, place: int, entrants: int) -> Fact:
    return Fact(p, offset, "EntryQueued", {
        "intent_id": intent, "sale_id": "s", "sku": f"k{p}", "user_id": user, "quantity": 1,
        "kind": "ENTRY", "entrants": entrants, "queued": place, "sequence": offset,
        "decided_at": 1_800_000_000_100})  # fmt: skip


def test_a_queued_intent_is_pushed_and_answered_as_queued_until_its_drawn_decision():
    async def scenario() -> None:
        a = feed(window=3)
        stream, _ = a.subscribe("u", None)
        a.apply([queued(0, 0, "u", "q", 7, 12)])
        views = IntentViews(_Rows(), Receipts("s" * 48), decisions=a.decision)
        waiting = json.loads((await views.get("u", "q", None)).body)
        assert (waiting["status"], waiting["position"], waiting["entrants"]) == ("queued", 7, 12)
        assert waiting["queue_kind"] == "entry"
        ranked = decision(0, 1, "u", "q")
        ranked.record.update(draw_rank=3, draw_size=12)
        a.apply([ranked])
        assert [intent for _, intent in drain(stream)] == ["q", "q"]  # queued, then drawn
        drawn = json.loads((await views.get("u", "q", None)).body)  # queued was not kept
        assert (drawn["status"], drawn["draw_rank"], drawn["draw_size"]) == ("accepted", 3, 12)
        a.apply([decision(0, 2, "v", "x"), decision(0, 3, "v", "y")])  # "q"'s queueing leaves
        assert a.decision("q") == ranked  # the window: its decision is still there

    asyncio.run(scenario())


def progress(
    p: int,
    offset: int,
    input_offset: int,
    remaining: int,
    written_at: float,
    sold_out: bool = False,
) -> Fact:
    record = {"sale_id": "s", "sku": "k0", "after_sequence": offset, "remaining": remaining,
              "sold_out": sold_out, "input_partition": 0, "input_offset": input_offset,
              "decided_at": 1_800_000_000_000 + input_offset,
              "written_at": int(written_at)}  # fmt: skip
    return Fact(p, offset, "QueueProgress", record)


def test_waiting_intents_learn_how_far_ahead_the_writer_is_and_all_at_once_when_it_is_gone():
    async def scenario() -> None:
        f = feed()
        receipts, rows = Receipts("s" * 48), _Rows()
        views = IntentViews(rows, receipts, decisions=f.decision, waiting=f.waiting.status)
        users = ("u", "v", "w", "x")
        streams = {u: f.subscribe(u, None)[0] for u in users}
        for n, user in enumerate(users[:3]):  # 202s at input offsets 500, 600, 700
            f.placed(user, f"i-{user}", "s", "k0", 1, Appended(0, 500 + 100 * n, 1))
        t = time.time() * 1000
        f.apply([progress(0, 0, 99, remaining=5, written_at=t)])
        pushed = {u: [fact.record for _, fact in drain_facts(s)] for u, s in streams.items()}
        assert [r["ahead"] for r in pushed["u"]] == [400] and pushed["w"][0]["ahead"] == 600
        assert pushed["u"][0]["eta_s"] is None  # one sample: no rate yet
        IntentStatus.model_validate(status_of_fact(Fact(0, 0, "Waiting", pushed["u"][0])))
        # A receipt without the feed's help: the same numbers from the GET.
        sig = receipts.sign("i-v", "v", "s", "k0", 1, Appended(0, 600, 1))
        answer = json.loads((await views.get("v", "i-v", ("s", "k0", 1, sig))).body)
        assert (answer["status"], answer["ahead"], answer["sold_out"]) == ("queued", 500, False)
        # 200 records in 0.2 s by the writer's clock (read here at once): 1,000 records/s.
        f.apply([progress(0, 1, 299, remaining=3, written_at=t + 200)])
        assert all(not drain_facts(s) for s in streams.values())  # within a second: no push
        answer = json.loads((await views.get("v", "i-v", ("s", "k0", 1, sig))).body)
        assert (answer["ahead"], answer["eta_s"]) == (300, 0.3)
        f.apply([decision(0, 2, "u", "i-u")])  # u is decided: no longer waiting
        assert [fact.name for _, fact in drain_facts(streams["u"])] == ["IntentAccepted"]
        # x's 202 was answered late: the writer is past it already (a repeat it ignored).
        f.placed("x", "i-x", "s", "k0", 1, Appended(0, 120, 1))
        f.apply([progress(0, 3, 550, remaining=0, written_at=t + 300, sold_out=True)])
        told = {u: [fact.record for _, fact in drain_facts(s)] for u, s in streams.items()}
        assert told["u"] == [] and told["x"] == []
        assert [(r["sold_out"], r["ahead"]) for r in told["v"]] == [(True, 49)]
        assert [(r["sold_out"], r["ahead"]) for r in told["w"]] == [(True, 149)]
        assert len(f.waiting) == 2  # v and w; x waits no more
        f.apply([Fact(0, 4, "UnitsReturned", {"sale_id": "s", "sku": "k0", "remaining": 1,
                                               "quantity": 1})])  # fmt: skip
        answer = json.loads((await views.get("v", "i-v", ("s", "k0", 1, sig))).body)
        assert answer["sold_out"] is False  # units came back

    asyncio.run(scenario())


def drain_facts(stream: Any) -> list[tuple[str, Fact]]:
    out = []
    while not stream.queue.empty():
        out.append(stream.queue.get_nowait())
    return out


def test_a_waitlisted_intent_is_pushed_and_answered_as_waitlisted_until_a_unit_comes_back():
    async def scenario() -> None:
        a = feed()
        stream, _ = a.subscribe("u", None)
        record = {"intent_id": "w", "sale_id": "s", "sku": "k0", "user_id": "u", "quantity": 1,
                  "position": 4, "sequence": 9, "decided_at": 1_800_000_000_000}  # fmt: skip
        a.apply([Fact(0, 0, "Waitlisted", record)])
        views = IntentViews(_Rows(), Receipts("s" * 48), decisions=a.decision)
        waiting = json.loads((await views.get("u", "w", None)).body)
        assert (waiting["status"], waiting["position"]) == ("waitlisted", 4)
        a.apply([decision(0, 1, "u", "w")])  # a held unit came back to it
        assert [fact.name for _, fact in drain_facts(stream)] == ["Waitlisted", "IntentAccepted"]
        assert json.loads((await views.get("u", "w", None)).body)["status"] == "accepted"

    asyncio.run(scenario())


def test_an_orders_transitions_reach_its_owner_live_and_on_resume():
    from producers.http.models import OrderStatus
    from producers.http.statuses import order_status_of_fact

    base = {"sale_id": "s", "sku": "k0", "decided_at": 1_800_000_000_500}
    held = Fact(0, 0, "IntentAccepted", {**decision(0, 0, "u", "a").record, "order_id": "ord-a"})
    paused = Fact(0, 1, "IntentDeferred", {**base, "intent_id": "p", "user_id": "u",
                                           "quantity": 1, "position": 3,
                                           "sequence": 2})  # fmt: skip
    started = Fact(0, 2, "PaymentStarted", {**base, "order_id": "ord-a", "attempt_id": "t1",
                                            "user_id": "u", "pay_by": 1_800_000_060_000,
                                            "sequence": 3})  # fmt: skip
    # No user id in these two: the owner is the one of the accepted intent behind the order.
    declined = Fact(0, 3, "PaymentDeclined", {**base, "order_id": "ord-a", "attempt_id": "t1",
                                              "sequence": 4})  # fmt: skip
    refused = Fact(0, 4, "OrderRefused", {**base, "order_id": "ord-a", "command": "CancelHold",
                                          "ref": "", "detail": "payment t2 is in progress",
                                          "sequence": 5})  # fmt: skip
    # An order whose accepted intent is not in the window: no owner to tell.
    other = Fact(0, 5, "PaymentDeclined", {**base, "order_id": "ord-zz", "attempt_id": "t9",
                                           "sequence": 6})  # fmt: skip
    log = [held, paused, started, declined, refused, other]

    async def scenario() -> None:
        a = feed()
        stream, _ = a.subscribe("u", None)
        a.apply(log)
        got = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
        assert [fact.name for _, fact in got] == ["IntentAccepted", "IntentDeferred",
                                                  "PaymentStarted", "PaymentDeclined",
                                                  "OrderRefused"]  # fmt: skip
        assert IntentStatus.model_validate(status_of_fact(paused)).status == "paused"
        statuses = [OrderStatus.model_validate(order_status_of_fact(f.name, f.record))
                    for _, f in got[2:]]  # fmt: skip
        assert [s.status for s in statuses] == ["paying", "declined", "refused"]
        assert statuses[2].detail == "CancelHold: payment t2 is in progress"
        # Resumed on another server after the payment started: the rest, nothing twice.
        b = feed()
        b.apply(log)
        again, gap = b.subscribe("u", got[2][0])
        assert not gap
        rest = [fact.name for _, fact in (again.queue.get_nowait() for _ in range(2))]
        assert rest == ["PaymentDeclined", "OrderRefused"] and again.queue.empty()

    asyncio.run(scenario())
