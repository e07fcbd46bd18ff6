"""PostgresProjector against the real broker and database.

The topics are shared with every other test and keep their history, so each test seeds its
projection's offsets at the topics' current ends (its own "offset 0") and projects only its
own sale ids; comparisons look only at those sale ids' rows.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from flashsale.settings import REPO_ROOT, Settings
from flashsale.topics import DEAD_LETTERS, TopicNames, catalogue
from infra import migrate, provision
from infra.stack import Endpoints
from projections.postgres import PostgresProjector, ProjectionError, reset
from schemas.codec import encode

T0 = 1_760_000_000_000
REASONS = ("USER_LIMIT", "ORDER_MAX_EXCEEDED", "SALE_ENDED")


# Tests never write into the default namespace: this module's log has its own topics.
NAMESPACE = "t-projection"
NAMES = TopicNames.of(dataclasses.replace(Settings.from_env({}), namespace=NAMESPACE))
DECISIONS = NAMES.decisions


@pytest.fixture(scope="module", autouse=True)
def migrated(endpoints: Endpoints, settings: Settings) -> None:
    migrate.apply(endpoints.dsn)
    created, _ = provision.ensure_topics(
        endpoints.bootstrap, catalogue(dataclasses.replace(settings, namespace=NAMESPACE))
    )
    deadline = time.monotonic() + 30
    while created:  # a topic created just now may not have a leader yet
        try:
            log_ends(endpoints.bootstrap)
            break
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- building the log ----------------------------------------------------------------------
def envelope(correlation: str | None = None) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "correlation_id": correlation,
        "producer": "test-projection",
        "occurred_at": T0,
    }


def sale_opened(sale_id: str, sku: str, allocation: int) -> bytes:
    return encode(
        "SaleOpened",
        {
            **envelope(),
            "sale_id": sale_id,
            "sku": sku,
            "allocation": allocation,
            "per_user_limit": 3,
            "per_order_max": 3,
            "starts_at": T0,
            "ends_at": T0 + 3_600_000,
            "rules_version": 1,
            "sequence": 1,
            "decided_at": T0,
        },
    )


def decisions(sale_id: str, sku: str, n: int, allocation: int, seed: int) -> list[dict]:
    """n decisions for one SKU, sequence 2..n+1 (after SaleOpened), as the core would emit them."""
    rng = random.Random(seed)
    remaining = allocation
    out = []
    for seq in range(2, n + 2):
        intent = f"i-{sku}-{seq}"
        q = rng.randint(1, 3)
        base = {
            **envelope(intent),
            "intent_id": intent,
            "sale_id": sale_id,
            "sku": sku,
            "user_id": f"u-{sku}-{rng.randint(1, n // 2 + 1)}",
            "quantity": q,
            "sequence": seq,
            "decided_at": T0 + seq,
        }
        if rng.random() < 0.15:
            out.append({**base, "reason": rng.choice(REASONS), "remaining": remaining})
        elif q <= remaining:
            remaining -= q
            out.append({**base, "order_id": f"o-{intent}", "remaining": remaining})
        else:
            reason = "SOLD_OUT" if remaining == 0 else "INSUFFICIENT_STOCK"
            out.append({**base, "reason": reason, "remaining": remaining, "detail": "no"})
    return out


def record_name(decision: dict) -> str:
    return "IntentAccepted" if "order_id" in decision else "IntentRejected"


def produce(bootstrap: str, records: list[tuple[str, str, bytes]]) -> None:
    """(topic, key, value) in order, acks=all, the Java-compatible partitioner."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "linger.ms": 10,
        }
    )
    failures: list[str] = []
    for topic, key, value in records:
        producer.produce(
            topic,
            value,
            key=key.encode(),
            on_delivery=lambda err, _m: failures.append(str(err)) if err else None,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert failures == []


def build_log(sale_id: str, skus: list[str], per_sku: int, dup_every: int) -> tuple[list, list]:
    """Records to produce (with exact duplicates of some decisions) and the unique decisions."""
    records: list[tuple[str, str, bytes]] = []
    unique: list[dict] = []
    for i, sku in enumerate(skus):
        allocation = per_sku  # about half the intents win
        records.append((DECISIONS, sku, sale_opened(sale_id, sku, allocation)))
        for d in decisions(sale_id, sku, per_sku, allocation, seed=i):
            unique.append(d)
            value = encode(record_name(d), d)
            records.append((DECISIONS, sku, value))
            if d["sequence"] % dup_every == 0:
                records.append((DECISIONS, sku, value))  # a redelivered decision
    return records, unique


# -- offsets and rows ----------------------------------------------------------------------
def log_ends(bootstrap: str, topics: tuple[str, ...] = (DECISIONS,)) -> dict:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    try:
        metadata = consumer.list_topics(timeout=10)
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t in topics
            for p in metadata.topics[t].partitions
        }
    finally:
        consumer.close()


def seed_offsets(dsn: str, projection: str, offsets: dict) -> None:
    with psycopg.connect(dsn) as conn:
        conn.cursor().executemany(
            "INSERT INTO projection_offsets (projection, topic, partition, next_offset)"
            " VALUES (%s, %s, %s, %s)",
            [(projection, t, p, o) for (t, p), o in offsets.items()],
        )


def start_here(endpoints: Endpoints, name: str, records: list) -> dict:
    """Seed ``name``'s offsets at the log's current ends, then produce ``records``."""
    start = log_ends(endpoints.bootstrap)
    seed_offsets(endpoints.dsn, name, start)
    produce(endpoints.bootstrap, records)
    return start


def stored_offsets(dsn: str, projection: str) -> dict:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT topic, partition, next_offset FROM projection_offsets WHERE projection = %s",
            (projection,),
        ).fetchall()
    return {(t, p): o for t, p, o in rows}


DUMPS = {
    "sales": "SELECT * FROM sales WHERE sale_id = %s ORDER BY sku",
    "orders": "SELECT * FROM orders WHERE sale_id = %s ORDER BY order_id",
    "intent_outcomes": "SELECT intent_id, sale_id, sku, user_id, quantity, outcome, reason,"
    " detail, order_id, remaining, sequence, decided_at FROM intent_outcomes"
    " WHERE sale_id = %s ORDER BY intent_id",
    "sale_counters": "SELECT * FROM sale_counters WHERE sale_id = %s ORDER BY sku",
}


def dump(dsn: str, sale_id: str) -> dict[str, list[tuple]]:
    with psycopg.connect(dsn) as conn:
        return {t: conn.execute(q, (sale_id,)).fetchall() for t, q in DUMPS.items()}


def outcome_count(dsn: str, sale_id: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM intent_outcomes WHERE sale_id = %s", (sale_id,)
        ).fetchone()
    return row[0] if row else 0


def assert_matches_log(rows: dict[str, list[tuple]], unique: list[dict], skus: list[str]) -> None:
    """Rows equal what the decisions say, computed here without the projector's code."""
    accepted = [d for d in unique if "order_id" in d]
    assert sorted(r[1] for r in rows["orders"]) == sorted(d["intent_id"] for d in accepted)
    assert sorted(r[0] for r in rows["intent_outcomes"]) == sorted(d["intent_id"] for d in unique)
    assert [r[1] for r in rows["sales"]] == sorted(skus)
    counters = {r[1]: r[2:] for r in rows["sale_counters"]}
    for sku in skus:
        mine = [d for d in unique if d["sku"] == sku]
        won = [d for d in mine if "order_id" in d]
        lost = Counter(d["reason"] for d in mine if "reason" in d)
        last = max(mine, key=lambda d: d["sequence"])
        assert counters[sku] == (
            len(won),
            sum(d["quantity"] for d in won),
            sum(lost.values()),
            dict(lost),
            last["remaining"],
            last["sequence"],
        )


def projector_for(
    endpoints: Endpoints, name: str, sale_id: str, batch_size: int = 2000
) -> PostgresProjector:
    """A projector of this module's log, for one sale, in a consumer group of its own."""
    return PostgresProjector(
        endpoints.bootstrap,
        endpoints.dsn,
        name=name,
        group_id=f"{name}-{uuid.uuid4().hex[:6]}",
        topics=NAMES,
        only_sales={sale_id},
        batch_size=batch_size,
    )


def project(endpoints: Endpoints, name: str, sale_id: str, timeout: float = 30) -> float:
    """Project the sale until caught up; return the throughput in rows/s while busy."""
    projector = projector_for(endpoints, name, sale_id)
    try:
        projector.run_until_caught_up(timeout)
        return projector.rows_written / max(projector.busy_seconds, 1e-9)
    finally:
        projector.close()


# -- tests ---------------------------------------------------------------------------------
def test_projects_decisions_once_and_converges_on_replay(endpoints: Endpoints, uid: str):
    sale_id, name = f"s-{uid}", f"test-proj-{uid}"
    skus = [f"k-{uid}-{i}" for i in range(3)]
    records, unique = build_log(sale_id, skus, per_sku=100, dup_every=7)
    start = start_here(endpoints, name, records)

    project(endpoints, name, sale_id)
    first = dump(endpoints.dsn, sale_id)
    assert_matches_log(first, unique, skus)

    # A second projection over the same tables and log changes nothing: counted once.
    seed_offsets(endpoints.dsn, f"{name}-again", start)
    project(endpoints, f"{name}-again", sale_id)
    assert dump(endpoints.dsn, sale_id) == first

    # Drop the rows and the offsets, replay from the test's start: identical rows.
    reset(endpoints.dsn, name, sale_ids=[sale_id])
    assert dump(endpoints.dsn, sale_id) == {t: [] for t in DUMPS}
    seed_offsets(endpoints.dsn, name, start)
    project(endpoints, name, sale_id)
    assert dump(endpoints.dsn, sale_id) == first


def test_projector_killed_mid_backlog_resumes_without_loss_or_double_count(
    endpoints: Endpoints, uid: str, tmp_path: Path
):
    sale_id, name = f"s-kill-{uid}", f"test-kill-{uid}"
    skus = [f"kk-{uid}-{i}" for i in range(4)]
    records, unique = build_log(sale_id, skus, per_sku=5000, dup_every=10)
    start = start_here(endpoints, name, records)
    end = log_ends(endpoints.bootstrap)
    total = len(unique)

    def spawn(log_name: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "projections.postgres", "--projection", name]
        cmd += ["--group", f"{name}-{log_name}", "--only-sale", sale_id, "--batch-size", "200"]
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": endpoints.bootstrap,
            "DATABASE_URL": endpoints.dsn,
            "FLASHSALE_LOG_FORMAT": "json",
            "FLASHSALE_NAMESPACE": NAMESPACE,
        }
        with (tmp_path / f"{log_name}.log").open("wb") as out:
            return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=out)

    proc = spawn("first")
    try:
        deadline = time.monotonic() + 30
        at_kill = 0
        while time.monotonic() < deadline and proc.poll() is None:
            at_kill = outcome_count(endpoints.dsn, sale_id)
            if at_kill >= 1000:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at_kill = outcome_count(endpoints.dsn, sale_id)  # the last batch may have committed
    assert proc.returncode == -signal.SIGKILL
    assert 0 < at_kill < total, f"kill must land mid-backlog, had {at_kill}/{total}"

    proc = spawn("second")
    try:
        began, deadline = time.monotonic(), time.monotonic() + 40
        while stored_offsets(endpoints.dsn, name) != end:
            assert proc.poll() is None, (tmp_path / "second.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "restarted projector did not catch up"
            time.sleep(0.05)
        resumed_s = time.monotonic() - began
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0  # graceful stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after_kill = dump(endpoints.dsn, sale_id)
    assert_matches_log(after_kill, unique, skus)

    # A clean, uninterrupted run over the same log gives the very same rows.
    reset(endpoints.dsn, name, sale_ids=[sale_id])
    seed_offsets(endpoints.dsn, name, start)
    rate = project(endpoints, name, sale_id, timeout=60)
    assert dump(endpoints.dsn, sale_id) == after_kill
    print(  # shown with -s: the throughput on this backlog
        f"\nprojector: clean run {rate:.0f} rows/s while busy ({len(records)} records);"
        f" restarted subprocess resumed {total - at_kill} rows in {resumed_s:.2f}s"
        " (incl. start-up and group join)"
    )


def test_undecodable_records_are_skipped_but_advance_offsets_and_commands_are_not_read(
    endpoints: Endpoints, uid: str
):
    names = TopicNames(f"tp-{uid}.sku-commands", f"tp-{uid}.decisions", DEAD_LETTERS)
    admin = AdminClient({"bootstrap.servers": endpoints.bootstrap})
    for future in admin.create_topics(
        [NewTopic(names.sku_commands, 1, 1), NewTopic(names.decisions, 1, 1)]
    ).values():
        future.result(30)
    sale_id, sku = f"s-bad-{uid}", f"k-bad-{uid}"
    (accepted,) = decisions(sale_id, sku, 1, 5, seed=1)
    intent = {
        **envelope("i-x"),
        "intent_id": "i-x",
        "idempotency_key": "x",
        "user_id": "u",
        "sale_id": sale_id,
        "sku": sku,
        "quantity": 1,
    }
    produce(
        endpoints.bootstrap,
        [
            (names.decisions, sku, sale_opened(sale_id, sku, 5)),
            (names.sku_commands, sku, encode("PurchaseIntent", intent)),
            (names.decisions, sku, b"not avro at all"),
            (names.decisions, sku, encode("IntentAccepted", accepted)),
        ],
    )
    projector = PostgresProjector(
        endpoints.bootstrap, endpoints.dsn, name=f"bad-{uid}", group_id=f"bad-{uid}", topics=names
    )
    try:
        assert projector.run_until_caught_up(30) == 2  # the sale and the one decision
    finally:
        projector.close()
    assert stored_offsets(endpoints.dsn, f"bad-{uid}") == {(names.decisions, 0): 3}
    rows = dump(endpoints.dsn, sale_id)
    assert [r[1] for r in rows["orders"]] == [accepted["intent_id"]]
    admin.delete_topics([names.sku_commands, names.decisions])


class _FailingWrite(Exception):
    pass


def test_an_error_in_the_writer_thread_surfaces_and_only_finished_batches_are_tracked(
    endpoints: Endpoints, uid: str
):
    """The runner writes on a thread while it decodes the next batch: a write that fails
    must fail the caller, leave its batch untracked, and lose nothing on the next run."""
    sale_id, name = f"s-pipe-{uid}", f"test-pipe-{uid}"
    skus = [f"kp-{uid}-{i}" for i in range(2)]
    records, unique = build_log(sale_id, skus, per_sku=600, dup_every=1000)
    start = start_here(endpoints, name, records)

    projector = projector_for(endpoints, name, sale_id, batch_size=100)
    real_write = projector.projection.write
    calls: list[int] = []  # outcomes each write inserted

    def write(conn: psycopg.Connection, rows: Any) -> int:
        if len(calls) == 2:
            calls.append(-1)
            raise _FailingWrite("third batch")
        calls.append(real_write(conn, rows))
        return calls[-1]

    projector.projection.write = write  # type: ignore[method-assign]
    try:
        with pytest.raises(_FailingWrite):
            projector.run_until_caught_up(60)
        finished = projector.positions()  # what the runner accounts as written
        # Spent: the batch decoded meanwhile is past the consumer, so going on would skip it.
        with pytest.raises(ProjectionError, match="a write failed"):
            projector.poll_batch()
    finally:
        projector.close()
    assert len(calls) == 3
    # Exactly the first two batches are in PostgreSQL, rows and tracked offsets alike.
    assert stored_offsets(endpoints.dsn, name) == {**start, **finished}
    assert outcome_count(endpoints.dsn, sale_id) == sum(calls[:2])
    assert 0 < sum(calls[:2]) < len(unique)

    # A fresh run projects the rest, and run_until_caught_up returns only once it is all
    # written (not just consumed): checked before close(), which would finish it anyway.
    again = projector_for(endpoints, name, sale_id, batch_size=400)
    slow_write = again.projection.write

    def slow(conn: psycopg.Connection, rows: Any) -> int:
        time.sleep(0.5)  # the batch stays in flight well past its consume
        return slow_write(conn, rows)

    again.projection.write = slow  # type: ignore[method-assign]
    try:
        again.run_until_caught_up(60)
        assert_matches_log(dump(endpoints.dsn, sale_id), unique, skus)
        assert stored_offsets(endpoints.dsn, name) == log_ends(endpoints.bootstrap)
    finally:
        again.close()
