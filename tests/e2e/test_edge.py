"""The HTTP edge end to end: nginx, two app servers, Kafka, processor, projector, Postgres."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import jwt
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from flashsale import input_audit
from flashsale.pseudonyms import KeyStore, Pseudonyms, is_pseudonym
from flashsale.sale_audit import audit_sale
from flashsale.settings import REPO_ROOT
from producers.commands import SkuAllocation
from producers.http.auth import token
from schemas.codec import SchemaRegistry
from tests.e2e.harness import (
    EdgeUnderTest,
    next_event,
    purchase_intents,
    sse_events,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def client():
    with httpx.Client(timeout=15) as c:
        yield c


def sku(name: str, allocation: int = 100, limit: int = 5, order_max: int = 3) -> dict:
    return {"sku": name, "allocation": allocation, "per_user_limit": limit,
            "per_order_max": order_max}  # fmt: skip


def test_intent_is_acknowledged_queued_then_decided_and_pushed(edge: EdgeUnderTest, client, uid):
    sale = f"life-{uid}"
    edge.open_sale(client, sale, [sku("k1")])
    state = client.get(f"{edge.url}/v1/sales/{sale}").json()
    assert state["skus"][0]["state"] == "open" and state["skus"][0]["remaining"] == 100
    me = edge.auth(f"buyer-{uid}")
    with sse_events(edge.url + "/v1/me/events", me) as events:
        resp = client.post(f"{edge.url}/v1/sales/{sale}/intents",
                           json={"sku": "k1", "quantity": 2}, headers=me)  # fmt: skip
        assert resp.status_code == 202, resp.text
        body = resp.json()
        intent = body["intent_id"]
        assert body["status"] == "queued" and resp.headers["location"] == body["status_url"]
        assert body["status_url"].startswith(f"/v1/intents/{intent}?sale_id={sale}&sku=k1&")
        # The 202 came after the ack: the record is in the topic right now.
        in_topic = purchase_intents(edge.pipeline.endpoints.bootstrap,
                                    edge.pipeline.names.sku_commands, sale)  # fmt: skip
        assert [r["intent_id"] for r in in_topic] == [intent]
        first = client.get(edge.url + body["status_url"], headers=me).json()
        assert first["status"] in ("queued", "accepted")
        assert "position" in first
        pushed = next_event(events, timeout=60)
    assert pushed is not None, "no event arrived on the stream"
    assert pushed["event"] == "intent" and pushed["intent_id"] == intent
    assert pushed["status"] == "accepted" and pushed["order_id"]
    final = client.get(edge.url + body["status_url"], headers=me).json()
    assert final["status"] == "accepted" and final["order_id"] == pushed["order_id"]
    # One format on the stream and in the API (it was "...+00:00" on the stream, "...Z" here).
    assert pushed["decided_at"] == final["decided_at"] and final["decided_at"].endswith("Z")

    other = client.get(edge.url + body["status_url"], headers=edge.auth(f"other-{uid}"))
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    unknown = client.get(f"{edge.url}/v1/intents/{uuid.uuid4().hex}", headers=me)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_intent"


def test_a_stream_resumes_on_the_other_server_with_exactly_the_missed_events(
    edge: EdgeUnderTest, client, uid
):
    sale = f"resume-{uid}"
    edge.open_sale(client, sale, [sku("k1"), sku("k2"), sku("k3")])
    me = edge.auth(f"follower-{uid}")
    first, second = edge.edge.servers[0].url, edge.edge.servers[1].url
    posted = []
    with sse_events(first + "/v1/me/events", me) as events:
        for i, k in enumerate(("k1", "k2", "k3", "k1")):
            r = client.post(f"{edge.url}/v1/sales/{sale}/intents",
                            json={"sku": k, "quantity": 1}, headers=me)  # fmt: skip
            assert r.status_code == 202, (i, r.text)
            posted.append(r.json()["intent_id"])
            if i == 0:  # the first one is seen on the stream before the others are sent
                seen = next_event(events, timeout=60)
                assert seen is not None and seen["intent_id"] == posted[0]
    # The client's server "died" after the first event: it resumes on the other server.
    with sse_events(second + "/v1/me/events", {**me, "Last-Event-ID": seen["event_id"]}) as again:
        rest = [next_event(again, timeout=60) for _ in range(3)]
        extra = next_event(again, timeout=2)
    assert None not in rest, rest
    assert sorted(e["intent_id"] for e in rest) == sorted(posted[1:])  # each once, none lost
    assert extra is None, f"an event twice: {extra}"
    assert all(e["event"] == "intent" and e["event_id"] for e in rest)
    # A position from before any server's window is a reset, not a silent gap.
    with sse_events(second + "/v1/me/events", {**me, "Last-Event-ID": "not-a-position"}) as reset:
        event = next_event(reset, timeout=10)
    assert event is not None and event["event"] == "reset"


def test_retry_with_the_same_key_is_one_intent_one_decision_one_order(edge, client, uid):
    sale = f"idem-{uid}"
    edge.open_sale(client, sale, [sku("k1")])
    me = {**edge.auth(f"retry-{uid}"), "Idempotency-Key": f"key-{uid}"}
    url = f"{edge.url}/v1/sales/{sale}/intents"
    answers = [client.post(url, json={"sku": "k1", "quantity": 1}, headers=me) for _ in range(3)]
    assert [a.status_code for a in answers] == [202] * 3
    ids = {a.json()["intent_id"] for a in answers}
    assert len(ids) == 1
    conflict = client.post(url, json={"sku": "k1", "quantity": 2}, headers=me)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"

    (intent,) = ids
    status_url = edge.url + answers[0].json()["status_url"]
    decided = wait_for(lambda: client.get(status_url, headers=me).json()["status"] != "queued", 60)
    assert decided
    audit = edge.pipeline.audit(sale)
    assert not audit.wait_for({intent}, 30)
    audit.poll(1)
    assert len(audit.decisions) == 1 and not audit._conflicts
    with psycopg.connect(edge.pipeline.endpoints.dsn) as conn:
        row = conn.execute("SELECT count(*) FROM orders WHERE intent_id = %s", (intent,))
        assert row.fetchone() == (1,)
    # A retry after the decision still answers the same 202.
    again = client.post(url, json={"sku": "k1", "quantity": 1}, headers=me)
    assert again.status_code == 202 and again.json()["intent_id"] == intent


def test_auth_and_role_matrix(edge: EdgeUnderTest, client, uid):
    url = f"{edge.url}/v1/sales/any/intents"
    body = {"sku": "k1", "quantity": 1}
    secret = "e2e-secret-" + "x" * 40
    expired = token("u", "shopper", 10, secret, now=1_000_000)
    forged = token("u", "admin", 600, "not-the-secret-" + "y" * 40)
    none_alg = jwt.encode({"sub": "u", "role": "admin", "iat": 1, "exp": 2**40}, None, "none")
    for header in (None, "Bearer", "Basic dTpw", "Bearer a.b.c", f"Bearer {expired}",
                   f"Bearer {forged}", f"Bearer {none_alg}"):  # fmt: skip
        headers = {"Authorization": header} if header else {}
        resp = client.post(url, json=body, headers=headers)
        assert resp.status_code == 401, (header, resp.text)
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["error"]["code"] == "unauthenticated"
    shopper = edge.auth(f"s-{uid}")
    admin_body = {"sale_id": f"x-{uid}", "skus": [sku("k")], "starts_in_s": 0, "duration_s": 60}
    resp = client.post(edge.url + "/v1/admin/sales", json=admin_body, headers=shopper)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    resp = client.post(f"{edge.url}/v1/admin/sales/x-{uid}/close", headers=shopper)
    assert resp.status_code == 403
    resp = client.post(f"{edge.url}/v1/admin/sales/x-{uid}/close", headers=edge.auth("a", "admin"))
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_sale"

    # Roles are separate: an admin token neither buys nor follows intents, and writes nothing.
    sale = f"roles-{uid}"
    edge.open_sale(client, sale, [sku("k1")])
    admin = {**edge.auth(f"a-{uid}", "admin"), "Idempotency-Key": f"adm-{uid}"}
    resp = client.post(f"{edge.url}/v1/sales/{sale}/intents", json=body, headers=admin)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden", resp.text
    resp = client.get(f"{edge.url}/v1/me/events", headers=admin)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden", resp.text
    resp = client.post(f"{edge.url}/v1/sales/{sale}/intents", json=body, headers=shopper)
    assert resp.status_code == 202, resp.text  # the same body from a shopper is taken
    in_topic = purchase_intents(edge.pipeline.endpoints.bootstrap,
                                edge.pipeline.names.sku_commands, sale)  # fmt: skip
    keys = KeyStore(edge.pipeline.endpoints.dsn, edge.pipeline.settings.namespace)
    assert [r["user_id"] for r in in_topic] == [keys.known(f"s-{uid}")]  # a pseudonym


def test_the_log_names_a_pseudonym_and_erasure_unties_it_from_the_person(edge, client, uid):
    """No record names the person, only their pseudonym; `flashsale user erase` deletes their
    key: the log stays as it was, the audit still passes on it, nobody can tie the records to
    the person any more, and an app server's cached pseudonym runs out."""
    sale, person = f"priv-{uid}", f"alice.{uid}@example.com"
    edge.open_sale(client, sale, [sku("k1")])
    me = {**edge.auth(person), "Idempotency-Key": f"pv-{uid}"}
    resp = client.post(f"{edge.url}/v1/sales/{sale}/intents", json={"sku": "k1", "quantity": 1},
                       headers=me)  # fmt: skip
    assert resp.status_code == 202, resp.text
    status_url = edge.url + resp.json()["status_url"]
    decided = wait_for(lambda: client.get(status_url, headers=me).json()["status"] != "queued", 60)
    assert decided and client.get(status_url, headers=me).json()["status"] == "accepted"
    settings, bootstrap = edge.pipeline.settings, edge.pipeline.endpoints.bootstrap
    keys = KeyStore(edge.pipeline.endpoints.dsn, settings.namespace)
    alias = keys.known(person)
    assert alias is not None and is_pseudonym(alias)

    def the_sales_records() -> list[tuple[bytes, str | None, dict]]:
        names, registry = edge.pipeline.names, SchemaRegistry.load_default()
        found = []
        for topic, committed in ((names.sku_commands, False), (names.decisions, True)):
            msgs = input_audit.read_topic(bootstrap, topic, committed, 30)
            for m, (_, _, name, rec) in zip(msgs, input_audit.decode_all(registry, msgs),
                                            strict=True):  # fmt: skip
                if rec and rec.get("sale_id") == sale:
                    raw = (
                        (m.key() or b"")
                        + (m.value() or b"")
                        + b"".join(v or b"" for _, v in m.headers() or ())
                    )
                    found.append((raw, name, rec))
        return found

    before = the_sales_records()
    named = {rec["user_id"] for _, _, rec in before if "user_id" in rec}
    assert {"IntentAccepted", "PurchaseIntent"} <= {n for _, n, _ in before}
    assert named == {alias}
    assert not any(person.encode() in raw for raw, _, _ in before)  # not in any byte

    env = {**os.environ, "FLASHSALE_NAMESPACE": settings.namespace}
    erase = [sys.executable, "-m", "flashsale.cli", "user", "erase", "--user", person]
    done = subprocess.run(erase, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0 and "erased" in done.stdout, done.stderr
    assert keys.known(person) is None
    again = subprocess.run(erase, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert again.returncode == 1 and "no key" in again.stdout
    assert [raw for raw, _, _ in the_sales_records()] == [raw for raw, _, _ in before]
    assert audit_sale(bootstrap, edge.pipeline.names, sale).passed

    async def resolved_twice() -> tuple[str, str, str]:
        async with AsyncConnectionPool(edge.pipeline.endpoints.dsn, min_size=1) as pool:
            resolver = Pseudonyms(pool, settings.namespace, cache_s=0.5)
            first = await resolver.of(f"bob-{uid}")
            keys.erase(f"bob-{uid}")
            cached = await resolver.of(f"bob-{uid}")
            await asyncio.sleep(0.6)
            return first, cached, await resolver.of(f"bob-{uid}")

    first, cached, later = asyncio.run(resolved_twice())
    assert cached == first and later != first and later == keys.known(f"bob-{uid}")


def test_rate_limit_holds_across_two_servers(edge: EdgeUnderTest, client, uid):
    sale = f"rate-{uid}"
    edge.open_sale(client, sale, [sku("k1", allocation=10_000, limit=10_000)])
    heavy = edge.auth(f"heavy-{uid}")
    url = f"{edge.url}/v1/sales/{sale}/intents"

    def post(_: int) -> httpx.Response:
        with httpx.Client(timeout=15) as c:
            return c.post(url, json={"sku": "k1", "quantity": 1}, headers=heavy)

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, range(60)))
    elapsed = time.monotonic() - started
    codes = Counter(a.status_code for a in answers)
    assert codes[429] > 0 and set(codes) <= {202, 429}, codes
    assert codes[202] <= 10 + 5 * elapsed + 1, (codes, elapsed)
    for a in answers:
        if a.status_code == 429:
            assert int(a.headers["retry-after"]) >= 1
            assert a.json()["error"]["code"] == "rate_limited"
    assert len({a.headers["x-served-by"] for a in answers}) == 1, "one user, one server"

    # Many users: each sticks to one server, and together they use both.
    served: dict[str, set[str]] = {}
    for i in range(24):
        user = f"spread-{uid}-{i}"
        for _ in range(3):
            r = client.get(f"{edge.url}/v1/intents/none", headers=edge.auth(user))
            served.setdefault(user, set()).add(r.headers["x-served-by"])
    assert all(len(s) == 1 for s in served.values()), served
    assert len(set().union(*served.values())) == 2, "both app servers served traffic"


def test_bad_input_gets_a_json_4xx_and_writes_nothing(edge: EdgeUnderTest, client, uid):
    sale, closed, gone = f"bad-{uid}", f"closed-{uid}", f"gone-{uid}"
    edge.open_sale(client, sale, [sku("k1", order_max=2)])
    edge.open_sale(client, closed, [sku("k1")])
    edge.open_sale(client, gone, [sku("k1", allocation=0)])
    resp = client.post(f"{edge.url}/v1/admin/sales/{closed}/close", headers=edge.auth("a", "admin"))
    assert resp.status_code == 202, resp.text
    wait_for(lambda: client.get(f"{edge.url}/v1/sales/{closed}").json()["skus"][0]["state"]
             == "ended", 30)  # fmt: skip
    time.sleep(0.6)  # each app server caches a sale's terms for 0.5 s

    url = f"{edge.url}/v1/sales/{sale}/intents"
    json_ct = {"content-type": "application/json"}
    cases = [
        (url, b"{not json", json_ct, 400, "malformed_json"),
        (url, b'{"sku": "k1", "quantity": "1"}', json_ct, 422, "invalid_request"),
        (url, b'{"sku": 1, "quantity": 1}', json_ct, 422, "invalid_request"),
        (url, b'{"sku": "k1", "quantity": 1, "coupon": "x"}', json_ct, 422, "invalid_request"),
        (url, b'{"sku": "k1", "quantity": 0}', json_ct, 422, "invalid_request"),
        (url, b'{"sku": "k1", "quantity": -3}', json_ct, 422, "invalid_request"),
        (url, b'{"sku": "k1"}', json_ct, 422, "invalid_request"),
        (url, b"[]", json_ct, 422, "invalid_request"),
        (url, b'{"sku": "k1", "quantity": 3}', json_ct, 422, "order_max_exceeded"),
        (url, b'{"sku": "nope", "quantity": 1}', json_ct, 404, "unknown_sku"),
        (url, b'{"sku": "k1", "quantity": 1, "pad": "' + b"x" * 5000 + b'"}', json_ct, 413,
         "body_too_large"),
        (url, b'{"sku": "k1", "quantity": 1}', {**json_ct, "Idempotency-Key": "bad key!"}, 422,
         "invalid_request"),
        (f"{edge.url}/v1/sales/nosuch-{uid}/intents", b'{"sku": "k1", "quantity": 1}', json_ct,
         404, "unknown_sale"),
        (f"{edge.url}/v1/sales/{closed}/intents", b'{"sku": "k1", "quantity": 1}', json_ct, 409,
         "sale_closed"),
        (f"{edge.url}/v1/sales/{gone}/intents", b'{"sku": "k1", "quantity": 1}', json_ct, 409,
         "sold_out"),
    ]  # fmt: skip
    for i, (target, body, headers, status, code) in enumerate(cases):
        resp = client.post(target, content=body, headers={**headers, **edge.auth(f"b{i}-{uid}")})
        assert resp.status_code == status, (body[:60], resp.text)
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"]["code"] == code, (body[:60], resp.text)
    for path, method, status in (("/nowhere", "GET", 404), (f"/v1/sales/{sale}", "DELETE", 405)):
        resp = client.request(method, edge.url + path)
        assert resp.status_code == status and "error" in resp.json()

    bootstrap, topic = edge.pipeline.endpoints.bootstrap, edge.pipeline.names.sku_commands
    for s in (sale, closed, gone, f"nosuch-{uid}"):
        assert purchase_intents(bootstrap, topic, s) == [], f"a rejected request wrote to {s}"


def test_health_readiness_and_metrics(edge: EdgeUnderTest, client):
    assert client.get(edge.url + "/healthz").json() == {"status": "ok"}
    # Operational details are not served to the public through the load balancer ...
    for path in ("/readyz", "/metrics", "/metrics/"):
        hidden = client.get(edge.url + path)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found", path
        assert "flashsale_" not in hidden.text and "checks" not in hidden.text
    # ... but on each app server's own port, for operators.
    for server in edge.edge.servers:
        ready = client.get(server.url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"kafka": True, "postgres": True}
        text = client.get(server.url + "/metrics").text
        assert "flashsale_http_requests_total" in text
        assert "flashsale_http_request_duration_seconds_bucket" in text
        assert "flashsale_intents_accepted_total" in text
        assert "flashsale_http_rate_limited_total" in text
        assert "flashsale_http_unavailable_total" in text


def test_a_sale_id_is_claimed_once_and_a_partial_open_is_reported(edge: EdgeUnderTest, client, uid):
    admin = edge.auth("ops", "admin")
    url = edge.url + "/v1/admin/sales"

    def body(allocation: int, skus: tuple[str, ...] = ("k1",)) -> dict:
        return {"sale_id": f"claim-{uid}", "skus": [sku(k, allocation) for k in skus],
                "starts_in_s": -1, "duration_s": 600}  # fmt: skip

    def post(b: dict) -> httpx.Response:
        with httpx.Client(timeout=30) as c:
            return c.post(url, json=b, headers=admin)

    with ThreadPoolExecutor(2) as pool:  # two admins, one id, other terms, at once
        answers = list(pool.map(post, [body(10), body(20)]))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 409], [a.text for a in answers]
    won = next(a for a in answers if a.status_code == 201).json()
    lost = next(a for a in answers if a.status_code == 409).json()
    assert lost["error"]["code"] == "sale_exists"
    # The 201 came once the SKU's writer opened it, and carries the terms in force.
    assert won["terms"][0]["allocation"] in (10, 20) and won["skus"] == ["k1"]
    in_force = won["terms"][0]["allocation"]
    state = wait_for(lambda: client.get(f"{edge.url}/v1/sales/claim-{uid}").json().get("skus"), 30)
    assert state[0]["allocation"] == in_force
    # The same opening again (its answer was lost): the same 201, nothing new is written.
    again = post(body(in_force))
    assert again.status_code == 201 and again.json()["terms"] == won["terms"], again.text

    # A SKU already open on its writer with other terms (the id was never claimed through the
    # API): the other SKU opens, this one is refused, and the answer says so per SKU.
    sale = f"partial-{uid}"
    edge.pipeline.open_sale(sale, [SkuAllocation("k1", 5, 1, 1)])
    resp = post({**body(7, ("k1", "k2")), "sale_id": sale})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "sale_refused", resp.text
    outcomes = {d["sku"]: d["outcome"] for d in resp.json()["error"]["details"]}
    assert outcomes == {"k1": "refused", "k2": "opened"}
