"""Everything around the writer under faults, mid-sale: the projector killed before its commit,
PostgreSQL and the broker stopped, an app server killed with requests in flight, the sale clock
stopped during holds and during a pre-queue, poison records on the input topics, and the
writer's disk full."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from confluent_kafka import Producer

from flashsale import input_audit
from flashsale.settings import Settings
from infra import migrate, processes
from infra.kafka import LocalKafka
from infra.postgres import LocalPostgres
from infra.stack import Endpoints
from producers.crowd import PlannedIntent
from producers.identity import intent_id_for
from schemas.codec import SchemaRegistry
from tests.conftest import free_port, local_only
from tests.faults.checks import verify
from tests.faults.harness import (
    HOLD_S,
    Hit,
    Sale,
    System,
    now_ms,
    open_sale,
    plan_sale,
    run_sale,
    whole_system,
)
from tests.integration.pipeline import partition_of

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.destructive]

SERVICES = ("processor", "projector", "analytics", "clock", "payments")


def restart_the_dead(system: System, seconds: float) -> list[str]:
    """For ``seconds``, start every service that exited as soon as it did (the supervisor's
    job; here the harness's): the names restarted."""
    restarted: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in SERVICES:
            if system.service(name).pid() is None:
                system.service(name).start(system.env)
                restarted.append(name)
        time.sleep(0.2)
    return restarted


def _growing(sale: Sale) -> int:
    return len(sale.live.queued) if sale.live else 0


def _answered(sale: Sale) -> list[PlannedIntent]:
    """The planned intents the crowd has had a 202 for so far."""
    done = set(sale.live.queued) if sale.live else set()
    return [p for p in sale.plan if f"{p.user_id}-{p.idempotency_key}" in done]


def _ask_again(system: System, sale: Sale, people: list[PlannedIntent]) -> int:
    """Each asks once more (a new key, the same SKU: over the limit, so rejected, no hold);
    the 202s they got."""
    got = 0
    with httpx.Client(timeout=10) as client:
        for p in people:
            headers = {"Authorization": "Bearer " + sale.tokens[p.user_id],
                       "Idempotency-Key": f"down-{p.idempotency_key}"}  # fmt: skip
            reply = client.post(f"{system.edge.url}/v1/sales/{sale.sale_id}/intents",
                                json={"sku": p.sku, "quantity": 1}, headers=headers)  # fmt: skip
            got += reply.status_code == 202
    return got


def _retried(sale: Sale) -> int:
    return sale.live.retried_after_429_or_503 if sale.live else 0


@pytest.mark.ci
def test_projector_killed_between_its_rows_and_its_commit_converges(
    settings: Settings, endpoints: Endpoints
) -> None:
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale()
        open_sale(system, sale)
        projector = system.pipeline.projector

        def kill_in_the_transaction(system: System, _: Sale) -> Hit:
            projector.stop()
            projector.start({**system.env, "FLASHSALE_PROJECTION_FAULT": "3"})
            pid = projector.pid()
            assert processes.wait_until(lambda: not processes.alive(pid), 120), "never fired"
            hit = Hit(now_ms(), detail={"pid": pid})
            projector.start(system.env)
            hit.ended_ms = now_ms()
            return hit

        run_sale(system, sale, kill_in_the_transaction, 0.3)
        verify(system, sale, "projector SIGKILL between rows and commit")
        # The hook fires inside a transaction that wrote rows; they were rolled back and
        # projected again by the restart (the replay above found the projection whole).
        assert [e["point"] for e in system.log_events("projector", "fault.injected")] == [
            "before-commit"
        ]


@pytest.fixture
def own_postgres(settings: Settings) -> Iterator[LocalPostgres]:
    """A PostgreSQL of this test's own (stopped mid-sale; the shared one serves the rest)."""
    local_only(settings)
    postgres = LocalPostgres(settings.state_dir / "test" / "pg-faults", free_port())
    postgres.start()
    migrate.apply(postgres.dsn)
    yield postgres
    postgres.stop()


def test_postgres_stopped_for_20_s_mid_sale(
    settings: Settings, endpoints: Endpoints, own_postgres: LocalPostgres
) -> None:
    """People the edge already knows still get 202 while PostgreSQL is away (their pseudonyms
    are cached; a person first seen then is told 503 and retries: their key lives in
    PostgreSQL); projections and payments exit and are restarted (the supervisor's job),
    converge once it is back, and the API answers again."""
    postgres = own_postgres
    with whole_system(settings, Endpoints(endpoints.bootstrap, postgres.dsn)) as system:
        sale = plan_sale()
        open_sale(system, sale)

        def outage(system: System, sale: Sale) -> Hit:
            hit = Hit(now_ms())
            queued_before = _growing(sale)
            known = _answered(sale)[:5]
            postgres.stop()
            try:
                time.sleep(2)
                known_202 = _ask_again(system, sale, known)
                time.sleep(18)
                queued_during = _growing(sale) - queued_before
            finally:
                postgres.start()
            hit.ended_ms = now_ms()
            hit.detail = {"known_people_202_while_down": known_202, "asked": len(known),
                          "crowd_queued_while_down": queued_during,
                          "restarted": restart_the_dead(system, 5)}  # fmt: skip
            return hit

        run_sale(system, sale, outage, 0.15, concurrency=4, pace_s=0.1)
        verify(system, sale, "PostgreSQL stopped 20 s")
        assert sale.hit is not None and sale.hit.detail["asked"] > 0
        assert sale.hit.detail["known_people_202_while_down"] == sale.hit.detail["asked"], (
            "a person the edge knew got no 202 while PostgreSQL was down"
        )
        with httpx.Client(timeout=10) as client:  # the API reads PostgreSQL again
            got = client.get(f"{system.edge.url}/v1/sales/{sale.sale_id}")
            assert got.status_code == 200 and len(got.json()["skus"]) == len(sale.skus)


def test_broker_stopped_mid_sale_no_202_intent_is_missing(
    settings: Settings, endpoints: Endpoints, private_broker: LocalKafka
) -> None:
    own_broker = private_broker
    ep = Endpoints(own_broker.bootstrap, endpoints.dsn)
    with whole_system(settings, ep) as system:
        sale = plan_sale()
        open_sale(system, sale)

        def outage(system: System, sale: Sale) -> Hit:
            hit = Hit(now_ms())
            own_broker.stop()  # returns once the broker process is gone
            time.sleep(1)  # an answer to a request acked just before is in by now
            queued_down, retried_down = _growing(sale), _retried(sale)
            time.sleep(9)
            queued_during = _growing(sale) - queued_down
            retried = _retried(sale) - retried_down
            own_broker.start()
            hit.ended_ms = now_ms()
            hit.detail = {"queued_while_down": queued_during, "retried_503": retried,
                          "restarted": restart_the_dead(system, 8)}  # fmt: skip
            return hit

        run_sale(system, sale, outage, 0.2, concurrency=4, pace_s=0.05)
        verify(system, sale, "broker stopped 10 s")
        assert sale.hit is not None
        # A 202 only with the broker's ack: none while it was away, and the crowd was told to
        # retry (a request sent meanwhile may still get its 202 once the broker is back).
        assert sale.hit.detail["queued_while_down"] == 0, sale.hit.detail
        assert sale.hit.detail["retried_503"] > 0, "the edge never answered 503"


def test_app_server_killed_with_requests_in_flight(
    settings: Settings, endpoints: Endpoints
) -> None:
    """Clients retry with their key after the 502 (or the dropped connection): one intent and
    one decision per key, whichever app server took the retry."""
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale()
        open_sale(system, sale)

        def kill_one(system: System, sale: Sale) -> Hit:
            server = system.edge.edge.servers[0]
            pid = server.pid()
            assert pid is not None
            hit = Hit(now_ms(), detail={"pid": pid})
            # Frozen first, for half a second: the requests nginx hands it meanwhile are surely
            # in flight when it dies (a bare SIGKILL sometimes fell between two requests).
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            assert processes.wait_until(lambda: not processes.alive(pid), 10)
            time.sleep(2)
            server.stop()  # its pid file
            server.start()
            hit.ended_ms = now_ms()
            return hit

        run_sale(system, sale, kill_one, 0.2, concurrency=32, pace_s=0.01)
        verify(system, sale, "app server SIGKILL with requests in flight")
        assert sale.crowd is not None
        assert sale.crowd.retried_after_gateway_error > 0, "no request was in flight at the kill"
        assert set(sale.crowd.statuses) == {202}, sale.crowd.statuses
        # One intent per key whichever server took the retry: each key's 202 names the intent
        # id derived from the key (and verify found one decision per intent id).
        for p in sale.plan:
            key = f"{p.user_id}-{p.idempotency_key}"
            alias = sale.alias[p.user_id]  # the edge derives it from the pseudonym
            assert sale.crowd.queued[key] == intent_id_for(alias, sale.sale_id, p.sku, key)


def _pause_clock(system: System, seconds: float) -> Hit:
    clock = system.service("clock")
    pid = clock.pid()
    assert pid is not None
    hit = Hit(now_ms(), detail={"pid": pid})
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(pid, signal.SIGCONT)
    hit.ended_ms = now_ms()
    return hit


def _ticks(system: System) -> list[int]:
    msgs = input_audit.read_topic(system.endpoints.bootstrap, system.pipeline.names.sku_commands,
                                  True, 30)  # fmt: skip
    registry = SchemaRegistry.load_default()
    return sorted(m.timestamp()[1] for m, (_, _, name, _) in
                  zip(msgs, input_audit.decode_all(registry, msgs), strict=True)
                  if name == "ClockTick")  # fmt: skip


def test_sale_clock_stopped_during_holds_expiry_waits_then_catches_up(
    settings: Settings, endpoints: Endpoints
) -> None:
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale()
        open_sale(system, sale)
        run_sale(system, sale, lambda s, _: _pause_clock(s, 10), 0.5)
        verify(system, sale, "sale clock stopped 10 s during holds")
        hit = sale.hit
        assert hit is not None
        ticks = [t for t in _ticks(system) if hit.at_ms - 2000 < t < hit.ended_ms + 3000]
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert gaps and max(gaps) >= 8000, "ticks went on: the clock was not stopped"
        # A hold whose deadline passed while the clock was stopped expired only after it.
        due = {r["order_id"]: r["decided_at"] + int(HOLD_S * 1000)
               for n, r in sale.facts if n == "IntentAccepted"}  # fmt: skip
        waited = [r for n, r in sale.facts if n == "HoldExpired"
                  and hit.at_ms + 1000 < due[r["order_id"]] < hit.ended_ms - 1000]  # fmt: skip
        assert waited, "no hold fell due while the clock was stopped"
        assert all(r["decided_at"] >= hit.ended_ms - 1000 for r in waited), "expired meanwhile"


def test_sale_clock_stopped_over_a_pre_queue_start_draws_late_once(
    settings: Settings, endpoints: Endpoints
) -> None:
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale(prequeue=True)
        open_sale(system, sale, starts_in_s=6)
        starts = now_ms() + 6000

        def over_the_start(system: System, _: Sale) -> Hit:
            time.sleep(max(0.0, (starts - 2000 - now_ms()) / 1000))
            return _pause_clock(system, 8)  # from 2 s before the start to 6 s after it

        run_sale(system, sale, over_the_start, 0.0, concurrency=8, pace_s=0.01)
        verify(system, sale, "sale clock stopped over the pre-queue's start")
        assert sale.hit is not None
        drawn = [r for n, r in sale.facts if n == "DrawRevealed"]
        assert len(drawn) == len(sale.skus), "one draw per SKU"
        assert all(r["decided_at"] >= sale.hit.ended_ms - 1000 for r in drawn), (
            "drawn while the clock was stopped"
        )


def test_poison_records_on_the_input_topics_are_set_aside_and_the_sale_flows(
    settings: Settings, endpoints: Endpoints
) -> None:
    local_only(settings)
    with whole_system(settings, endpoints) as system:
        sale = plan_sale()
        open_sale(system, sale)
        names = system.pipeline.names
        partition = partition_of(sale.skus[0], settings.partitions)

        def poison(system: System, _: Sale) -> Hit:
            hit = Hit(now_ms())
            producer = Producer({"bootstrap.servers": system.endpoints.bootstrap})
            bad = [b"", b"\x00\x01garbage", b"{not avro}", os.urandom(64)]
            for value in bad:  # the writer's input, and the projections' and the feed's
                producer.produce(names.sku_commands, value, key=sale.skus[0].encode())
                producer.produce(names.decisions, value, key=sale.skus[0].encode(),
                                 partition=partition)  # fmt: skip
            assert producer.flush(30) == 0
            hit.detail = {"per_topic": len(bad)}
            return hit

        run_sale(system, sale, poison, 0.4)
        verify(system, sale, "poison records on the command and decision topics")
        letters = _dead_letters(system)
        assert len(letters) >= 4, f"the writer set aside {len(letters)} of 4 poison commands"
        skipped = system.log_events("projector", "projection.undecodable")
        assert len(skipped) >= 4, "the projector did not skip the poison decisions"
        dead = [n for n in SERVICES if system.service(n).pid() is None]
        assert dead == [], f"poison killed {dead}"


def _dead_letters(system: System) -> list[object]:
    return input_audit.read_topic(system.endpoints.bootstrap,
                                  system.pipeline.names.dead_letters, True, 30)  # fmt: skip


def test_writer_disk_full_exits_without_committing_and_loses_nothing(
    settings: Settings, endpoints: Endpoints
) -> None:
    local_only(settings)
    sale = plan_sale()
    partition = partition_of(sale.skus[0], settings.partitions)
    fault = {"FLASHSALE_FAULT": f"enospc:state-write:{partition}:150"}
    with whole_system(settings, endpoints, fault) as system:
        system.pipeline.env.pop("FLASHSALE_FAULT")  # the restart has room again
        open_sale(system, sale)

        def wait_for_the_full_disk(system: System, _: Sale) -> Hit:
            pid = system.pipeline.processor.pid()
            assert processes.wait_until(lambda: not processes.alive(pid), 120), "never fired"
            hit = Hit(now_ms(), detail={"pid": pid})
            system.pipeline.processor.start(system.env)
            hit.ended_ms = now_ms()
            return hit

        run_sale(system, sale, wait_for_the_full_disk, 0.0)
        verify(system, sale, "writer's disk full (ENOSPC)")
        [crashed] = system.log_events("processor", "processor.crashed")
        assert "No space left" in crashed["reason"]
