"""Placing an intent: the service with fakes, receipts, the token cache, and the lean route
held to the FastAPI route's answers."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from flashsale.settings import Settings
from infra.stack import Endpoints
from producers.commands import Appended
from producers.http import errors
from producers.http.auth import TokenVerifier, Unauthenticated, token
from producers.http.config import EdgeSettings
from producers.http.context import EdgeContext
from producers.http.fastpath import LeanEdge
from producers.http.intake import (
    IntakeService,
    Placed,
    Receipt,
    Receipts,
    RecentIntents,
    Unacknowledged,
)
from producers.http.metrics import EdgeMetrics
from producers.http.ratelimit import RateLimiter
from producers.http.rules import Refused, SkuTerms
from producers.http.server import build_app
from producers.http.views import IntentViews, SaleViews
from producers.identity import intent_id_for

SECRET = "unit-test-secret-with-enough-bytes-for-hs256"
NOW = datetime(2030, 1, 1, tzinfo=UTC)
LOG_TIME_MS = int(NOW.timestamp() * 1000)


def terms(sku: str = "k", **over: Any) -> SkuTerms:
    base = dict(sale_id="s", sku=sku, allocation=10, per_user_limit=2, per_order_max=2,
                starts_at=NOW - timedelta(minutes=1), ends_at=NOW + timedelta(hours=1),
                closed=False, remaining=10)  # fmt: skip
    return SkuTerms(**{**base, **over})  # type: ignore[arg-type]


class FakeSales:
    def __init__(self, skus: dict[str, SkuTerms]) -> None:
        self.skus = skus
        self.projected: dict[str, tuple[str, str, int]] = {}
        self.rows: dict[str, dict[str, Any]] = {}  # intent_outcomes rows by intent id

    async def sale(self, sale_id: str) -> Mapping[str, SkuTerms]:
        return self.skus if sale_id == "s" else {}

    async def projected_intent(self, intent_id: str) -> tuple[str, str, int] | None:
        return self.projected.get(intent_id)

    async def intent_status(self, intent_id: str) -> dict[str, Any] | None:
        return self.rows.get(intent_id)


class FakeLog:
    """Records every produced intent; acks at once unless told to hold or fail."""

    def __init__(self) -> None:
        self.produced: list[tuple[str, str, str, int, str]] = []
        self.hold = False
        self.fail = False
        self.pending: list[asyncio.Future[Appended]] = []

    def submit_intent_async(
        self, sale_id: str, sku: str, user_id: str, quantity: int, idempotency_key: str
    ) -> tuple[str, asyncio.Future[Appended]]:
        self.produced.append((sale_id, sku, user_id, quantity, idempotency_key))
        fut: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(RuntimeError("broker down"))
        elif self.hold:
            self.pending.append(fut)
        else:
            fut.set_result(Appended(1, len(self.produced) - 1, LOG_TIME_MS))
        return intent_id_for(user_id, sale_id, sku, idempotency_key), fut


def service(
    sales: FakeSales | None = None,
    log: FakeLog | None = None,
    capacity: int = 100,
    ack_timeout_s: float = 5,
):
    return IntakeService(
        sales or FakeSales({"k": terms(), "j": terms("j")}),
        log or FakeLog(),
        Receipts(SECRET),
        RecentIntents(capacity),
        ack_timeout_s=ack_timeout_s,
        clock=lambda: NOW,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_retry_is_answered_from_memory_and_a_different_body_is_a_conflict():
    log = FakeLog()
    svc = service(log=log)

    async def scenario() -> None:
        first = await svc.place_intent("u", "s", "k", 1, "key")
        again = await svc.place_intent("u", "s", "k", 1, "key")
        assert (again.intent_id, again.receipt) == (first.intent_id, first.receipt)
        assert len(log.produced) == 1
        # Written and acknowledged (timed), or a repeat answered with nothing written.
        assert first.ack_s is not None and first.ack_s >= 0 and again.ack_s is None
        assert first.intent_id == intent_id_for("u", "s", "k", "key")
        for sku, q in (("k", 2), ("j", 1)):  # another quantity, another SKU: same key
            with pytest.raises(Refused) as refused:
                await svc.place_intent("u", "s", sku, q, "key")
            assert refused.value.code == "idempotency_conflict"
        other_user = await svc.place_intent("v", "s", "k", 1, "key")
        assert other_user.intent_id != first.intent_id
        a, b = (
            await svc.place_intent("u", "s", "k", 1, None),
            await svc.place_intent("u", "s", "k", 1, None),
        )
        assert a.intent_id != b.intent_id  # no key, no retry: each is an intent

    run(scenario())
    assert len(log.produced) == 4


def test_a_retry_while_the_first_waits_for_its_ack_waits_for_the_same_ack():
    log = FakeLog()
    log.hold = True
    svc = service(log=log)

    async def scenario() -> None:
        first = asyncio.create_task(svc.place_intent("u", "s", "k", 1, "key"))
        await asyncio.sleep(0)
        second = asyncio.create_task(svc.place_intent("u", "s", "k", 1, "key"))
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done()
        log.pending[0].set_result(Appended(2, 7, LOG_TIME_MS))
        a, b = await first, await second
        assert (a.intent_id, a.receipt) == (b.intent_id, b.receipt)
        assert a.receipt.endswith(f".2.{LOG_TIME_MS}.7")
        assert a.ack_s is not None and b.ack_s is None  # one write; the retry repeats it

    run(scenario())
    assert len(log.produced) == 1


def test_concurrent_attempts_with_one_key_write_once_and_a_different_body_conflicts():
    class SlowSales(FakeSales):
        async def sale(self, sale_id: str) -> Mapping[str, SkuTerms]:
            await asyncio.sleep(0.01)  # the first attempt is still checking the sale
            return await super().sale(sale_id)

    log = FakeLog()
    svc = service(SlowSales({"k": terms()}), log)

    async def scenario() -> None:
        first = asyncio.create_task(svc.place_intent("u", "s", "k", 1, "key"))
        await asyncio.sleep(0)
        same = asyncio.create_task(svc.place_intent("u", "s", "k", 1, "key"))
        other = asyncio.create_task(svc.place_intent("u", "s", "k", 2, "key"))
        results = await asyncio.gather(first, same, other, return_exceptions=True)
        a, b = results[0], results[1]
        assert isinstance(a, Placed) and isinstance(b, Placed)
        assert (a.intent_id, a.receipt, b.ack_s) == (b.intent_id, b.receipt, None)
        assert isinstance(results[2], Refused) and results[2].code == "idempotency_conflict"

    run(scenario())
    assert len(log.produced) == 1


def test_an_unacknowledged_intent_is_503_and_its_retry_writes_it_again():
    log = FakeLog()
    log.fail = True
    svc = service(log=log)

    async def scenario() -> None:
        with pytest.raises(Unacknowledged):
            await svc.place_intent("u", "s", "k", 1, "key")
        await asyncio.sleep(0)  # the done-callback forgets the failed entry
        log.fail = False
        placed = await svc.place_intent("u", "s", "k", 1, "key")
        assert placed.intent_id == intent_id_for("u", "s", "k", "key")

        # The failure arrives while the request waits for it.
        log.hold = True
        waiting = asyncio.create_task(svc.place_intent("u", "s", "k", 1, "key2"))
        await asyncio.sleep(0.01)
        log.pending[0].set_exception(RuntimeError("message timed out"))
        with pytest.raises(Unacknowledged):
            await waiting

    run(scenario())
    assert len(log.produced) == 3


def test_certain_rejections_write_nothing_unless_the_retry_was_answered_202_before():
    sales = FakeSales({"k": terms(remaining=0)})
    log = FakeLog()
    svc = service(sales, log)

    async def scenario() -> None:
        with pytest.raises(Refused) as refused:
            await svc.place_intent("u", "s", "k", 1, "key")
        assert refused.value.code == "sold_out"
        with pytest.raises(Refused) as refused:
            await svc.place_intent("u", "nosuch", "k", 1, "key")
        assert refused.value.code == "unknown_sale"
        # Answered 202 before (by a server that has since died): the same answer, no write.
        sales.projected[intent_id_for("w", "s", "k", "old")] = ("w", "k", 1)
        placed = await svc.place_intent("w", "s", "k", 1, "old")
        assert placed.intent_id == intent_id_for("w", "s", "k", "old") and placed.ack_s is None
        with pytest.raises(Refused):  # another body under that key is not that intent
            await svc.place_intent("w", "s", "k", 2, "old")

    run(scenario())
    assert log.produced == []


def test_a_sku_the_log_has_opened_but_the_projection_not_yet_goes_to_the_writer():
    log = FakeLog()
    svc = service(FakeSales({"k": terms()}), log)
    svc.in_log = lambda sale_id, sku: (sale_id, sku) == ("s", "new")

    async def scenario() -> None:
        await svc.place_intent("u", "s", "new", 1, "key")
        with pytest.raises(Refused):
            await svc.place_intent("u", "s", "other", 1, "key2")

    run(scenario())
    assert len(log.produced) == 1


def test_an_unknown_sku_is_refused_only_once_the_feed_has_read_to_the_log_end():
    """The app server's feed lags: the SaleOpened it had not read yet is read while it
    catches up, so the intent goes to the writer; a SKU still unknown then is refused (404);
    a feed that cannot catch up in time is not sure: 503, retry (nothing written)."""
    log = FakeLog()
    svc = service(FakeSales({"k": terms()}), log)
    read: set[tuple[str, str]] = set()
    svc.in_log = lambda sale_id, sku: (sale_id, sku) in read
    rounds: list[bool] = []

    async def catch_up() -> bool:
        rounds.append(True)
        read.add(("s", "opened-just-now"))  # in the log before the call, read while waiting
        return True

    svc.caught_up = catch_up

    async def scenario() -> None:
        await svc.place_intent("u", "s", "opened-just-now", 1, "key")
        with pytest.raises(Refused) as refused:
            await svc.place_intent("u", "s", "never-opened", 1, "key2")
        assert refused.value.code == "unknown_sku"

        async def not_sure() -> bool:
            return False

        svc.caught_up = not_sure
        with pytest.raises(Refused) as refused:
            await svc.place_intent("u", "s", "maybe-opened", 1, "key3")
        assert refused.value.code == "sale_unconfirmed"
        assert errors.refusal("sale_unconfirmed", "").status == 503
        assert errors.refusal("sale_unconfirmed", "").headers == {"Retry-After": "1"}

    run(scenario())
    assert [p[1] for p in log.produced] == ["opened-just-now"]
    assert len(rounds) == 2


def test_the_table_of_recent_intents_is_bounded():
    log = FakeLog()
    svc = service(log=log, capacity=3)

    async def scenario() -> None:
        for i in range(5):
            await svc.place_intent("u", "s", "k", 1, f"key{i}")
        await svc.place_intent("u", "s", "k", 1, "key0")  # evicted: produced again
        await svc.place_intent("u", "s", "k", 1, "key4")  # still there: not produced

    run(scenario())
    assert len(svc.recent) == 3 and len(log.produced) == 6


def test_receipts_prove_exactly_the_fields_they_were_signed_for():
    r = Receipts(SECRET)
    sig = r.sign("i", "u", "s", "k", 2)
    assert r.verify(sig, "i", "u", "s", "k", 2) == Receipt()
    for fields in (("j", "u", "s", "k", 2), ("i", "v", "s", "k", 2), ("i", "u", "t", "k", 2),
                   ("i", "u", "s", "j", 2), ("i", "u", "s", "k", 3)):  # fmt: skip
        assert r.verify(sig, *fields) is None
    assert Receipts("another-secret-" + "z" * 40).verify(sig, "i", "u", "s", "k", 2) is None
    assert r.verify("\u00e9" * 22, "i", "u", "s", "k", 2) is None  # no TypeError (fuzzer-found)


def test_a_receipt_proves_where_the_log_put_the_intent_and_that_cannot_be_moved():
    r = Receipts(SECRET)
    sig = r.sign("i", "u", "s", "k", 2, Appended(3, 41, 1_700_000_000_123))
    assert sig.endswith(".3.1700000000123.41") and len(sig) == 22 + len(".3.1700000000123.41")
    assert r.verify(sig, "i", "u", "s", "k", 2) == Receipt(3, 1_700_000_000_123, 41)
    mac = sig.split(".")[0]
    for moved in (f"{mac}.4.1700000000123.41", f"{mac}.3.1700000009999.41",
                  f"{mac}.3.1700000000123.40", f"{mac}.3.1700000000123", mac):  # fmt: skip
        assert r.verify(moved, "i", "u", "s", "k", 2) is None
    # A receipt signed before receipts carried the offset still proves partition and time.
    fields = "i\x1fu\x1fs\x1fk\x1f2"
    older = f"{r._mac(fields + chr(0x1F) + '3.1700000000123')}.3.1700000000123"
    assert r.verify(older, "i", "u", "s", "k", 2) == Receipt(3, 1_700_000_000_123)
    # A topic that does not stamp the broker's time: the receipt proves the fields only.
    assert r.verify(r.sign("i", "u", "s", "k", 2, Appended(3, 41, None)), "i", "u", "s", "k", 2) \
        == Receipt()  # fmt: skip


def test_the_token_cache_still_honours_expiry_and_never_caches_a_failure():
    tv = TokenVerifier(SECRET)
    header = f"Bearer {token('u', 'shopper', 1, SECRET)}"
    assert tv.verify(header).user_id == "u" and header in tv._cache
    time.sleep(1.05)  # past exp: the cached entry is not used, and the full check fails
    with pytest.raises(Unauthenticated):
        tv.verify(header)
    forged = f"Bearer {token('u', 'admin', 60, 'x' * 48)}"
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            tv.verify(forged)
    assert forged not in tv._cache


# -- the lean route answers as the FastAPI route does ---------------------------------------
def _app(tmp_path: Path, lean: bool, sales: FakeSales, log: FakeLog) -> TestClient:
    settings = Settings.from_env({"FLASHSALE_STATE_DIR": str(tmp_path)})
    cfg = dataclasses.replace(EdgeSettings(), lean_intents=lean, rate_per_s=1000, rate_burst=1000)
    app = build_app(settings, Endpoints("127.0.0.1:1", "postgresql://nowhere/x"), cfg, "t")
    svc = service(sales, log)
    app.state.edge = EdgeContext(
        config=cfg, tokens=TokenVerifier(SECRET), producer=None, store=sales, feed=None,  # type: ignore[arg-type]
        limiter=RateLimiter(1000, 1000), metrics=EdgeMetrics(), intake=svc,
        readers=RateLimiter(1000, 1000), sale_views=SaleViews(sales, clock=lambda: NOW),  # type: ignore[arg-type]
        intent_views=IntentViews(sales, svc.receipts), sales=None,  # type: ignore[arg-type]
        pseudonyms=SamePseudonyms(),  # type: ignore[arg-type]
    )  # fmt: skip
    return TestClient(LeanEdge(app))


class SamePseudonyms:
    """Every user is their own pseudonym (both routes must answer alike; PostgreSQL's
    keys are exercised in tests/e2e/test_edge.py and tests/integration/test_pseudonyms.py)."""

    async def of(self, user_id: str) -> str:
        return user_id


def _auth(user: str = "u", role: str = "shopper") -> dict[str, str]:
    # A day: the cases are built at collection, and the suite may run long after it.
    return {"Authorization": "Bearer " + token(user, role, 86_400, SECRET)}


JSON = {"content-type": "application/json"}
CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}',
     {**JSON, **_auth(), "Idempotency-Key": "a1"}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}',
     {**JSON, **_auth(), "Idempotency-Key": "a1"}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 2}',
     {**JSON, **_auth(), "Idempotency-Key": "a1"}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}', JSON),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}', {**JSON, **_auth("a", "admin")}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}',
     {**JSON, "Authorization": "Bearer x.y.z"}),
    ("/v1/sales/s/intents", b"{nope", {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b"{nope", {**JSON, "Authorization": "Bearer x.y.z"}),
    ("/v1/sales/s/intents", b"[]", {**JSON, "Authorization": "Bearer x.y.z"}),
    ("/v1/sales/s/intents", b"", {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b"[]", {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": "1"}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": true}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1.0}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 0}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1000001}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k"}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1, "x": 1}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k k", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k\\n", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 3}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "zz", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}',
     {"content-type": "text/plain", **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1}',
     {**JSON, **_auth(), "Idempotency-Key": "bad key!"}),
    ("/v1/sales/nosuch/intents", b'{"sku": "k", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/bad%20id/intents", b'{"sku": "k", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/gone/intents", b'{"sku": "k", "quantity": 1}', {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1, "p": "' + b"x" * 5000 + b'"}',
     {**JSON, **_auth()}),
    ("/v1/sales/s/intents", b'{"sku": "k", "quantity": 1, "p": "' + b"x" * 5000 + b'"}', JSON),
]  # fmt: skip


def _answers(client: TestClient) -> list[tuple[int, Any]]:
    out = []
    for path, body, headers in CASES:
        resp = client.post(path, content=body, headers=headers)
        data = resp.json()
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.headers["x-served-by"] == "t"
        if resp.status_code == 202:
            assert resp.headers["location"] == data["status_url"]
            out.append((202, (data["intent_id"] if "Idempotency-Key" in headers else None,
                              data["status"])))  # fmt: skip
        else:
            assert set(data) == {"error"}, data
            out.append((resp.status_code, data["error"]["code"]))
    return out


def test_the_lean_route_answers_every_case_as_the_fastapi_route_does(tmp_path: Path):
    results = {}
    for lean in (True, False):
        sales, log = FakeSales({"k": terms()}), FakeLog()
        client = _app(tmp_path, lean, sales, log)
        results[lean] = (_answers(client), log.produced)
        # What never reaches the log is in the edge's metrics: the repeat and the two acks.
        metrics = client.app.state.edge.metrics  # type: ignore[attr-defined]
        assert metrics.intents_accepted._value.get() == 3
        assert metrics.intent_repeats._value.get() == 1
        assert _count(metrics.kafka_ack) == 2
    assert results[True][0] == results[False][0]
    # Three 202s, two writes: the retry of "a1" was answered from memory.
    assert [c for c, _ in results[True][0]].count(202) == 3
    assert len(results[True][1]) == len(results[False][1]) == 2


def _count(histogram: Any) -> float:
    return sum(s.value for m in histogram.collect() for s in m.samples
               if s.name.endswith("_count"))  # fmt: skip


def test_a_receipt_answers_queued_until_the_projection_has_the_intent(tmp_path: Path):
    client = _app(tmp_path, True, FakeSales({"k": terms()}), FakeLog())
    url = client.post(
        "/v1/sales/s/intents", json={"sku": "k", "quantity": 2}, headers=_auth()
    ).json()["status_url"]
    status = client.get(url, headers=_auth())
    assert status.status_code == 200, status.text
    assert status.json() | {"intent_id": None} == {
        "intent_id": None, "sale_id": "s", "sku": "k", "quantity": 2, "status": "queued",
        "position": None, "order_id": None, "reason": None, "detail": None, "decided_at": None,
        "entrants": None, "queue_kind": None, "draw_rank": None, "draw_size": None,
        "ahead": None, "eta_s": None, "sold_out": None,
    }  # fmt: skip
    views = client.app.state.edge.intent_views  # type: ignore[attr-defined]
    before = views.queries
    assert client.get(url, headers=_auth()).status_code == 200
    assert views.queries == before  # polled again within the miss TTL: no query
    forged = url.replace("quantity=2", "quantity=1")
    bare = url.split("?")[0]
    for target, who in ((forged, "u"), (bare, "u"), (url, "someone-else")):
        resp = client.get(target, headers=_auth(who))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_intent"


def test_reads_are_rendered_once_validated_by_etag_and_limited_on_their_own(tmp_path: Path):
    client = _app(tmp_path, True, FakeSales({"k": terms()}), FakeLog())
    edge = client.app.state.edge  # type: ignore[attr-defined]
    edge.readers = RateLimiter(0.01, 2)
    first = client.get("/v1/sales/s")
    assert first.status_code == 200 and first.json()["skus"][0]["state"] == "open"
    assert first.headers["cache-control"] == "public, max-age=1"
    again = client.get("/v1/sales/s", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert edge.sale_views.rendered == 1  # the second read was not rendered again
    limited = client.get("/v1/sales/s")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    # Posting intents has its own bucket: reads did not use it up.
    posted = client.post("/v1/sales/s/intents", json={"sku": "k", "quantity": 1}, headers=_auth())
    assert posted.status_code == 202


def _reads(client: TestClient, sales: FakeSales) -> list[tuple[int, Any]]:
    sales.rows["d1"] = {"intent_id": "d1", "user_id": "u", "sale_id": "s", "sku": "k",
                        "quantity": 1, "outcome": "accepted", "reason": None, "detail": "",
                        "order_id": "o1", "decided_at": NOW}  # fmt: skip
    url = client.post(
        "/v1/sales/s/intents", json={"sku": "k", "quantity": 2},
        headers={**_auth(), "Idempotency-Key": "r1"},
    ).json()["status_url"]  # fmt: skip
    base, query = url.split("?")
    cases = [
        (url, _auth()), (base, _auth()), (url.replace("quantity=2", "quantity=1"), _auth()),
        (url, _auth("other")), (url, {}), (url, _auth("a", "admin")),
        ("/v1/intents/d1", _auth()), ("/v1/intents/d1", _auth("other")),
        ("/v1/intents/nope", _auth()), ("/v1/intents/" + "x" * 129, _auth()),
        (base + "?" + query.replace("quantity=2", "quantity=x"), _auth()),
        (base + "?" + query.replace("quantity=2", "quantity=0"), _auth()),
        (base + "?" + query.replace("sku=k", "sku=a%20b"), _auth()),
        (base + "?sale_id=s&sku=k&quantity=2&receipt=short", _auth()),
    ]  # fmt: skip
    out: list[tuple[int, Any]] = []
    for target, headers in cases:
        resp = client.get(target, headers=headers)
        if resp.status_code == 200:
            out.append((200, (resp.json(), resp.headers["etag"], resp.headers["cache-control"])))
            again = client.get(target, headers={**headers, "If-None-Match": resp.headers["etag"]})
            out.append((again.status_code, again.headers["etag"]))
        else:
            out.append((resp.status_code, resp.json()["error"]["code"]))
    return out


def test_the_lean_status_route_answers_every_case_as_the_fastapi_route_does(tmp_path: Path):
    results = {}
    for lean in (True, False):
        sales = FakeSales({"k": terms()})
        results[lean] = _reads(_app(tmp_path, lean, sales, FakeLog()), sales)
    assert results[True] == results[False]
    codes = [c for c, _ in results[True]]
    assert codes.count(200) == 2 and codes.count(304) == 2 and 422 in codes and 403 in codes


def test_a_receipt_signed_by_the_previous_version_is_still_accepted():
    import base64
    import hashlib
    import hmac

    key = hmac.new(SECRET.encode(), b"flashsale intent receipts v1", "sha256").digest()
    mac = hmac.new(key, b"i\x1fu\x1fs\x1fk\x1f2", hashlib.sha256).digest()[:16]
    old = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()  # as HMAC-SHA256 receipts were
    r = Receipts(SECRET)
    assert r.verify(old, "i", "u", "s", "k", 2) == Receipt()
    assert r.verify(old, "i", "u", "s", "k", 3) is None
    assert r.sign("i", "u", "s", "k", 2) != old  # new receipts use the new MAC


def test_an_ack_that_never_comes_fails_in_time_and_frees_the_key_for_a_retry():
    log = FakeLog()
    log.hold = True  # the producer never reports (closed, or its report timer stopped)
    svc = service(log=log, ack_timeout_s=0.05)

    async def scenario() -> None:
        with pytest.raises(Unacknowledged, match="in time"):
            await svc.place_intent("u", "s", "k", 1, "key")
        await asyncio.sleep(0)  # the slot's done-callbacks run on the next turn
        assert svc.recent.get(("u", "s", "key")) is None  # a retry writes it again
        log.hold = False
        placed = await svc.place_intent("u", "s", "k", 1, "key")
        assert placed.intent_id == intent_id_for("u", "s", "k", "key")

    run(scenario())
    assert len(log.produced) == 2
