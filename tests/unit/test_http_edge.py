"""The HTTP edge's pure parts: tokens, token buckets, request models, error shape, rules."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from flashsale.settings import Settings
from infra.stack import Endpoints
from producers.http import errors
from producers.http.auth import Unauthenticated, load_secret, token, verify
from producers.http.models import IntentRequest, OpenSaleRequest
from producers.http.ratelimit import RateLimiter
from producers.http.rules import Refused, SkuTerms, check_intent, hopeless, state_of
from producers.http.server import build_app

SECRET = "unit-test-secret-with-enough-bytes-for-hs256"


# -- tokens -------------------------------------------------------------------------------
def test_token_round_trip():
    who = verify("Bearer " + token("u1", "admin", 60, SECRET), SECRET)
    assert (who.user_id, who.role, who.is_admin) == ("u1", "admin", True)


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic dTpw", "Bearer not.a.jwt", "Bearer " + "x" * 20],
)
def test_missing_or_malformed_tokens_are_unauthenticated(header):
    with pytest.raises(Unauthenticated):
        verify(header, SECRET)


def test_expired_token_is_unauthenticated():
    old = token("u1", "shopper", 10, SECRET, now=1_000_000)
    with pytest.raises(Unauthenticated, match="expired"):
        verify("Bearer " + old, SECRET)


def test_forged_tokens_are_unauthenticated():
    forged = token("u1", "admin", 60, "another-secret-of-the-same-sufficient-length")
    with pytest.raises(Unauthenticated):
        verify("Bearer " + forged, SECRET)
    unsigned = jwt.encode({"sub": "u1", "role": "admin", "iat": 1, "exp": 2**40}, None, "none")
    with pytest.raises(Unauthenticated):
        verify("Bearer " + unsigned, SECRET)
    bad_role = jwt.encode({"sub": "u1", "role": "root", "iat": 1, "exp": 2**40}, SECRET, "HS256")
    with pytest.raises(Unauthenticated):
        verify("Bearer " + bad_role, SECRET)


def test_unknown_role_cannot_be_issued():
    with pytest.raises(ValueError):
        token("u1", "root", 60, SECRET)


def test_secret_is_generated_once_with_private_permissions(tmp_path: Path):
    first = load_secret(tmp_path)
    assert load_secret(tmp_path) == first and first.kid == "k1" and len(first.secret) >= 48
    assert stat.S_IMODE(os.stat(tmp_path / "jwt-keys" / "k1.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "jwt-keys").st_mode) == 0o700
    assert load_secret(tmp_path, "configured").secret == "configured"


# -- token buckets --------------------------------------------------------------------------
def test_bucket_grants_burst_then_refills_at_rate():
    clock = [0.0]
    limiter = RateLimiter(rate=5, burst=10, clock=lambda: clock[0])
    assert [limiter.check("u") for _ in range(10)] == [0] * 10
    assert limiter.check("u") == 1  # empty: 0.2 s until a token, rounded up to 1 s
    assert limiter.check("other") == 0, "buckets are per user"
    clock[0] += 0.2
    assert limiter.check("u") == 0
    assert limiter.check("u") >= 1


def test_retry_after_is_whole_seconds_and_honest():
    clock = [0.0]
    limiter = RateLimiter(rate=0.25, burst=1, clock=lambda: clock[0])
    assert limiter.check("u") == 0
    assert limiter.check("u") == 4
    clock[0] += 4
    assert limiter.check("u") == 0


@given(
    rate=st.floats(0.5, 100),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=300),
)
def test_granted_never_exceeds_burst_plus_rate_times_elapsed(rate, burst, gaps):
    now = [0.0]
    limiter = RateLimiter(rate, burst, clock=lambda: now[0])
    granted = 0
    for gap in gaps:
        now[0] += gap
        granted += limiter.check("u") == 0
        assert granted <= burst + rate * now[0] + 1e-6


# -- request models -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"sku": "a"},
        {"sku": "a", "quantity": 0},
        {"sku": "a", "quantity": -1},
        {"sku": "a", "quantity": "1"},
        {"sku": "a", "quantity": 1.5},
        {"sku": "a", "quantity": True},
        {"sku": "", "quantity": 1},
        {"sku": "a b", "quantity": 1},
        {"sku": 7, "quantity": 1},
        {"sku": "a", "quantity": 1, "price": 0},
    ],
)
def test_invalid_intents_are_refused(body):
    with pytest.raises(ValidationError):
        IntentRequest.model_validate(body)


def test_valid_intent():
    assert IntentRequest.model_validate({"sku": "sku-1", "quantity": 2}).quantity == 2


def test_open_sale_needs_one_start_and_one_end():
    sku = {"sku": "s", "allocation": 1, "per_user_limit": 1, "per_order_max": 1}
    ok = OpenSaleRequest.model_validate({"sale_id": "x", "skus": [sku], "starts_in_s": 0,
                                         "duration_s": 60})  # fmt: skip
    assert ok.duration_s == 60
    for bad in (
        {"starts_in_s": 0},
        {"starts_in_s": 0, "starts_at": "2030-01-01T00:00:00Z", "duration_s": 1},
        {"starts_at": "2030-01-01T00:00:00", "duration_s": 1},
        {"starts_in_s": 0, "duration_s": 1, "skus": [sku, sku]},
    ):
        with pytest.raises(ValidationError):
            OpenSaleRequest.model_validate({"sale_id": "x", "skus": [sku], **bad})


# -- error shape ----------------------------------------------------------------------------
@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    errors.install(app)

    @app.post("/things")
    async def things(body: IntentRequest) -> dict[str, int]:
        return {"n": body.quantity}

    return TestClient(app)


def _shape(resp) -> str:
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
    assert resp.headers["content-type"].startswith("application/json")
    return str(body["error"]["code"])


def test_every_error_has_the_same_json_shape(client: TestClient):
    assert _shape(client.get("/nowhere")) == "not_found"
    assert _shape(client.get("/things")) == "method_not_allowed"
    bad_json = client.post("/things", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and _shape(bad_json) == "malformed_json"
    wrong = client.post("/things", json={"sku": "a", "quantity": "x"})
    assert wrong.status_code == 422 and _shape(wrong) == "invalid_request"
    assert "quantity" in wrong.json()["error"]["message"]


def test_oversized_body_is_413_before_anything_else(tmp_path: Path):
    settings = Settings.from_env({"FLASHSALE_STATE_DIR": str(tmp_path)})
    app = build_app(settings, Endpoints("127.0.0.1:1", "postgresql://nowhere/x"), server_id="t")
    resp = TestClient(app).post("/v1/sales/s/intents", content=b"x" * 5000)
    assert resp.status_code == 413 and _shape(resp) == "body_too_large"
    assert resp.headers["x-served-by"] == "t"


# -- rules --------------------------------------------------------------------------------
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def terms(**over) -> SkuTerms:
    base = dict(
        sale_id="s", sku="k", allocation=10, per_user_limit=2, per_order_max=2,
        starts_at=NOW - timedelta(minutes=1), ends_at=NOW + timedelta(hours=1),
        closed=False, remaining=10,
    )  # fmt: skip
    return SkuTerms(**{**base, **over})


def test_hopeless_is_nothing_remaining_and_nothing_held_that_could_come_back():
    assert hopeless(terms(remaining=0))
    assert not hopeless(terms(remaining=1))
    assert not hopeless(terms(remaining=0, holds=True))  # a held unit may expire and return
    assert state_of(terms(remaining=0, holds=True), NOW) == "open"


def test_states():
    assert state_of(terms(), NOW) == "open"
    assert state_of(terms(starts_at=NOW + timedelta(seconds=1)), NOW) == "not_open"
    assert state_of(terms(ends_at=NOW), NOW) == "ended"
    assert state_of(terms(closed=True), NOW) == "ended"
    assert state_of(terms(remaining=0), NOW) == "sold_out"


@pytest.mark.parametrize(
    ("skus", "sku", "qty", "status", "code"),
    [
        ({}, "k", 1, 404, "unknown_sale"),
        ({"k": terms()}, "other", 1, 404, "unknown_sku"),
        ({"k": terms()}, "k", 3, 422, "order_max_exceeded"),
        ({"k": terms(closed=True)}, "k", 1, 409, "sale_closed"),
        ({"k": terms(ends_at=NOW)}, "k", 1, 409, "sale_ended"),
        ({"k": terms(remaining=0)}, "k", 1, 409, "sold_out"),
    ],
)
def test_certain_rejections(skus, sku, qty, status, code):
    with pytest.raises(Refused) as err:
        check_intent("s", skus, sku, qty, NOW)
    answer = errors.refusal(err.value.code, err.value.message)
    assert (answer.status, answer.code) == (status, code)


def test_not_open_yet_and_low_stock_are_the_writers_call():
    check_intent("s", {"k": terms(starts_at=NOW + timedelta(hours=1))}, "k", 2, NOW)
    check_intent("s", {"k": terms(remaining=1)}, "k", 2, NOW)


# -- the OpenAPI document -------------------------------------------------------------------
def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_openapi_declares_the_error_shape_the_api_answers_with_and_json_schema_bounds():
    app = build_app(Settings.from_env({}), Endpoints("127.0.0.1:1", "postgresql://x@127.0.0.1:1/x"))
    doc = app.openapi()
    public = {p: ops for p, ops in doc["paths"].items() if p.startswith("/v1/")}
    assert len(public) >= 5
    for path, operations in public.items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorReply"}, (
                        method, path, status)  # fmt: skip
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    # pydantic's own names for bounds are not JSON Schema: a client generator ignores them.
    assert not _keys(doc["components"]["schemas"]) & {"ge", "le", "gt", "lt"}
    bounds = doc["components"]["schemas"]["OpenSaleRequest"]["properties"]["duration_s"]
    assert {"exclusiveMinimum": 0, "maximum": 366 * 86_400}.items() <= bounds["anyOf"][0].items()
