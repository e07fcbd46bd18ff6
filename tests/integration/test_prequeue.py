"""The pre-queue on real Kafka with the real writer: queued entries survive a SIGKILL, the
draw happens once, at the start, in the seed's order; no reveal means DRAW_NOT_REVEALED."""

from __future__ import annotations

import os
import secrets
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flashsale import fairness, input_audit, sale_audit
from flashsale.settings import Settings
from infra import processes
from infra.stack import Endpoints
from processors.core.prequeue import commitment, draw_order
from producers.commands import SkuAllocation
from producers.identity import intent_id_for
from schemas.codec import SchemaRegistry
from tests.conftest import local_only
from tests.integration.pipeline import Pipeline, partition_of, start_pipeline

pytestmark = pytest.mark.slow

Fact = tuple[str, dict[str, Any]]


@pytest.fixture
def pipeline(settings: Settings, endpoints: Endpoints) -> Iterator[Pipeline]:
    p = start_pipeline(settings, endpoints, uuid.uuid4().hex[:8])
    yield p
    p.stop()


def facts_of(pipeline: Pipeline, sale_id: str, until: Callable[[list[Fact]], bool],
             timeout: float = 90.0) -> list[Fact]:  # fmt: skip
    """The sale's committed facts, in log order, once ``until`` holds for them."""
    topic = pipeline.names.decisions
    return fairness.follow_sale(pipeline.endpoints.bootstrap, topic, sale_id, until, timeout)


count = fairness.counted


def test_entries_survive_a_writer_sigkill_and_are_drawn_once_in_the_seeds_order(
    settings: Settings, pipeline: Pipeline
) -> None:
    local_only(settings)
    uid = uuid.uuid4().hex[:8]
    sale, sku = f"pq-{uid}", f"sku-pq-{uid}"
    seed = secrets.token_hex(32)
    now = int(time.time() * 1000)
    starts = now + 25_000  # the window holds the kill, the early reveal and the restart
    producer = pipeline.producer()
    producer.open_sale(sale, [SkuAllocation(sku, 20, 1, 1)], starts, now + 3_600_000,
                       prequeue_opens_at_ms=now - 1_000,
                       draw_commitment=commitment(seed))  # fmt: skip
    users = [f"u{n:03d}" for n in range(60)]
    sends = [(u, f"k-{u}") for u in users] + [(u, f"again-{u}") for u in users[:10]]
    producer.wait([producer.submit_intent(sale, sku, u, 1, k)[1] for u, k in sends])
    facts_of(pipeline, sale, count("EntryQueued", 70))  # committed: in the writer's state

    pid = pipeline.processor.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert processes.wait_until(lambda: not processes.alive(pid), 20), "the writer outlived it"
    producer.reveal_draw(sale, [sku], seed)  # too early: refused after the restart
    producer.tick([partition_of(sku, settings.partitions)])
    assert pipeline.processor.start(pipeline.env)
    assert pipeline.processor.pid() != pid
    facts_of(pipeline, sale, count("SaleRefused", 1))
    time.sleep(max(0.0, (starts - time.time() * 1000) / 1000) + 0.5)
    producer.reveal_draw(sale, [sku], seed)
    producer.reveal_draw(sale, [sku], seed)  # a second reveal decides nothing
    producer.tick([partition_of(sku, settings.partitions)])
    facts = facts_of(pipeline, sale, count("IntentRejected", 50))
    time.sleep(2)
    facts = facts_of(pipeline, sale, count("IntentRejected", 50))  # and nothing more came

    names = Counter(name for name, _ in facts)
    assert names == {"SaleOpened": 1, "EntryQueued": 70, "SaleRefused": 1, "DrawRevealed": 1,
                     "IntentAccepted": 20, "IntentRejected": 50}, names  # fmt: skip
    refused = next(r for n, r in facts if n == "SaleRefused")
    assert "before the start" in refused["detail"]
    queued = [r for n, r in facts if n == "EntryQueued"]
    assert len({r["intent_id"] for r in queued}) == 70  # none queued twice after the restart
    assert Counter(r["kind"] for r in queued) == {"ENTRY": 60, "REPEAT": 10}
    drawn = next(r for n, r in facts if n == "DrawRevealed")
    assert (drawn["seed"], drawn["entrants"]) == (seed, 60)
    entries = [(r["user_id"], r["intent_id"], r["quantity"]) for r in queued
               if r["kind"] == "ENTRY"]  # fmt: skip
    digest, order = draw_order(seed, entries)
    assert drawn["entries_digest"] == digest
    decisions = [(n, r) for n, r in facts if n in ("IntentAccepted", "IntentRejected")]
    ranked = [r for _, r in decisions if r["draw_rank"]]
    assert [r["user_id"] for r in ranked] == [u for u, _, _ in order]
    assert [r["draw_rank"] for r in ranked] == list(range(1, 61))
    assert [n for n, r in decisions if r["draw_rank"]] == (["IntentAccepted"] * 20
                                                           + ["IntentRejected"] * 40)  # fmt: skip
    repeats = {intent_id_for(u, sale, sku, f"again-{u}") for u in users[:10]}
    assert {r["intent_id"] for _, r in decisions if not r["draw_rank"]} == repeats
    assert {r["reason"] for _, r in decisions if not r["draw_rank"]} == {"ALREADY_QUEUED"}

    audit = sale_audit.audit_sale(pipeline.endpoints.bootstrap, pipeline.names, sale)
    assert audit.passed, audit.violations
    account = input_audit.account(pipeline.endpoints.bootstrap, pipeline.names, sale)
    assert account.holds and account.decided == 70 and account.queued == 0, account
    fair = fairness.audit_fairness(pipeline.endpoints.bootstrap, pipeline.names, sale)
    assert fair.passed, fair.violations
    assert (fair.skus[sku].outcome, fair.skus[sku].entrants, fair.skus[sku].winners) == (
        "drawn",
        60,
        20,
    )
    # The projection keeps each drawn intent's rank, for when the live feed has moved on.
    import psycopg

    sql = "SELECT intent_id, draw_rank, draw_size FROM intent_outcomes WHERE sale_id = %s"

    def projected() -> list[tuple[str, int | None, int | None]]:
        with psycopg.connect(pipeline.endpoints.dsn) as conn:
            return conn.execute(sql, (sale,)).fetchall()

    assert processes.wait_until(lambda: len(projected()) == 70, 30)
    ranks = {r["intent_id"]: (r["draw_rank"] or None, r["draw_size"] or None)
             for _, r in decisions}  # fmt: skip
    assert {i: (k, n) for i, k, n in projected()} == ranks


def test_without_a_reveal_every_queued_intent_is_rejected_draw_not_revealed(
    settings: Settings, pipeline: Pipeline
) -> None:
    uid = uuid.uuid4().hex[:8]
    sale, sku = f"pq-none-{uid}", f"sku-pq-none-{uid}"
    now = int(time.time() * 1000)
    ends = now + 6_000
    producer = pipeline.producer()
    producer.open_sale(sale, [SkuAllocation(sku, 5, 1, 1)], now + 3_000, ends,
                       prequeue_opens_at_ms=now - 1_000,
                       draw_commitment=commitment(secrets.token_hex(32)))  # fmt: skip
    producer.wait([producer.submit_intent(sale, sku, f"u{n}", 1, "k")[1] for n in range(8)])
    facts_of(pipeline, sale, count("EntryQueued", 8))
    account = input_audit.account(pipeline.endpoints.bootstrap, pipeline.names, sale)
    assert account.holds and account.queued == 8 and account.decided == 0, account
    time.sleep(max(0.0, (ends - time.time() * 1000) / 1000) + 0.5)
    producer.tick([partition_of(sku, settings.partitions)])  # no intent comes: the clock ends it
    facts = facts_of(pipeline, sale, count("IntentRejected", 8))
    assert Counter(n for n, _ in facts) == {"SaleOpened": 1, "EntryQueued": 8, "QueueExpired": 1,
                                            "IntentRejected": 8}  # fmt: skip
    assert {r["reason"] for n, r in facts if n == "IntentRejected"} == {"DRAW_NOT_REVEALED"}
    audit = sale_audit.audit_sale(pipeline.endpoints.bootstrap, pipeline.names, sale)
    assert audit.passed, audit.violations


def test_the_sale_clock_ticks_every_partition_and_reveals_the_kept_seed_at_the_start(
    settings: Settings, pipeline: Pipeline
) -> None:
    import psycopg

    from infra.services import Service
    from producers.clock import DrawSeeds

    uid = uuid.uuid4().hex[:8]
    sale, sku = f"pq-clock-{uid}", f"sku-pq-clock-{uid}"
    now = int(time.time() * 1000)
    starts = now + 4_000
    ends = now + 600_000
    seeds = DrawSeeds(pipeline.endpoints.dsn, pipeline.settings.namespace)
    committed = seeds.commit(sale, [sku], starts - 60_000, ends)
    assert seeds.commit(sale, [sku], starts, ends) == committed  # one seed; the window moved
    # Due seeds the clock must not reveal: one never armed (its opening never completed),
    # one of another namespace (its own clock's).
    seeds.commit(f"{sale}-unarmed", [sku], now - 1_000, ends)
    others = DrawSeeds(pipeline.endpoints.dsn, f"other-{uid}")
    others.commit(sale, [sku], now - 1_000, ends)
    others.armed(sale)
    producer = pipeline.producer()
    producer.open_sale(sale, [SkuAllocation(sku, 2, 1, 1)], starts, ends,
                       prequeue_opens_at_ms=now - 1_000, draw_commitment=committed)  # fmt: skip
    seeds.armed(sale)
    producer.wait([producer.submit_intent(sale, sku, f"u{n}", 1, "k")[1] for n in range(5)])
    clock = Service("clock", pipeline.settings)
    assert clock.start({**pipeline.env, "FLASHSALE_CLOCK_TICK_MS": "200"})
    try:
        facts = facts_of(pipeline, sale, count("IntentRejected", 3), timeout=60)
    finally:
        assert clock.stop(), "the clock was not running at the end"
    drawn = [r for n, r in facts if n == "DrawRevealed"]
    assert len(drawn) == 1 and drawn[0]["decided_at"] >= starts
    with psycopg.connect(pipeline.endpoints.dsn) as conn:
        rows = conn.execute("SELECT namespace, sale_id, seed, revealed_at IS NOT NULL "
                            "FROM draw_seeds WHERE sale_id LIKE %s ORDER BY 1, 2",
                            (f"{sale}%",)).fetchall()  # fmt: skip
    ns = pipeline.settings.namespace
    assert {(r[0], r[1], r[3]) for r in rows} == {
        (ns, sale, True),
        (ns, f"{sale}-unarmed", False),
        (f"other-{uid}", sale, False),
    }
    assert next(r[2] for r in rows if r[0] == ns and r[1] == sale) == drawn[0]["seed"]
    assert Counter(n for n, _ in facts)["IntentAccepted"] == 2
    registry = SchemaRegistry.load_default()
    ticked = {p for p, _, name, _ in input_audit.decode_all(registry, input_audit.read_topic(
        pipeline.endpoints.bootstrap, pipeline.names.sku_commands, False, 30))
        if name == "ClockTick"}  # fmt: skip
    assert ticked == set(range(settings.partitions))
    assert sale_audit.audit_sale(pipeline.endpoints.bootstrap, pipeline.names, sale).passed


def test_bots_win_their_share_of_people_not_of_requests(pipeline: Pipeline) -> None:
    """2,000 people send one intent each over the window; 100 bots arrive first with 50
    intents each; 200 units, limit 1. First come, the bots would take 100 units; drawn, they
    get ~200 x 100 / 2,100 = 9.5 (hypergeometric, sd 2.9), so at most 30 bounds it at ~7 sd."""
    uid = uuid.uuid4().hex[:8]
    sale, sku = f"pq-fair-{uid}", f"sku-pq-fair-{uid}"
    seed = secrets.token_hex(32)
    now = int(time.time() * 1000)
    starts = now + 12_000
    producer = pipeline.producer()
    producer.open_sale(sale, [SkuAllocation(sku, 200, 1, 1)], starts, now + 600_000,
                       prequeue_opens_at_ms=now - 1_000,
                       draw_commitment=commitment(seed))  # fmt: skip
    bots = [f"bot{n:03d}" for n in range(100)]
    producer.wait([producer.submit_intent(sale, sku, b, 1, f"k{i}")[1]
                   for i in range(50) for b in bots])  # fmt: skip
    people = [f"person{n:04d}" for n in range(2_000)]
    for chunk in range(4):  # spread over the window
        time.sleep(1.0)
        producer.wait([producer.submit_intent(sale, sku, p, 1, "k")[1]
                       for p in people[chunk::4]])  # fmt: skip
    time.sleep(max(0.0, (starts - time.time() * 1000) / 1000) + 0.5)
    producer.reveal_draw(sale, [sku], seed)
    facts = facts_of(pipeline, sale, count("IntentRejected", 7_000 - 200), timeout=120)

    accepted = [r["user_id"] for n, r in facts if n == "IntentAccepted"]
    assert len(accepted) == 200 and len(set(accepted)) == 200
    bot_wins = sum(1 for u in accepted if u.startswith("bot"))
    queued = [r for n, r in facts if n == "EntryQueued" and r["kind"] == "ENTRY"]
    first_come = [r["user_id"] for r in queued][:200]
    assert sum(1 for u in first_come if u.startswith("bot")) == 100  # the race bots would win
    assert bot_wins <= 30, f"bots won {bot_wins} of 200 units with 100 of 2,100 entrants"
    repeats = [r for n, r in facts if n == "IntentRejected" and r["reason"] == "ALREADY_QUEUED"]
    assert len(repeats) == 100 * 49
    assert sale_audit.audit_sale(pipeline.endpoints.bootstrap, pipeline.names, sale).passed
