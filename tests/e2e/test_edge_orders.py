"""Paying and cancelling held orders through nginx and the app servers, end to end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from flashsale.fairness import counted, follow_sale
from infra.services import Service
from tests.e2e.harness import EdgeUnderTest, next_event, sse_events, wait_for
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def payments(pipeline: Pipeline) -> Iterator[Service]:
    service = Service("payments", pipeline.settings)
    service.start(pipeline.env)
    yield service
    service.stop()


def test_the_owner_pays_one_order_and_cancels_another_and_nobody_else_may(
    edge: EdgeUnderTest, payments: Service, uid: str
) -> None:
    sale = f"orders-{uid}"
    with httpx.Client(timeout=15) as client:
        body = {"sale_id": sale, "skus": [{"sku": "o1", "allocation": 5, "per_user_limit": 2,
                "per_order_max": 1}], "starts_in_s": -1, "duration_s": 600, "hold_s": 60,
                "pay_grace_s": 5}  # fmt: skip
        opened = client.post(f"{edge.url}/v1/admin/sales", json=body,
                             headers=edge.auth("adm", "admin"))  # fmt: skip
        assert opened.status_code == 201, opened.text
        assert (opened.json()["hold_s"], opened.json()["pay_grace_s"]) == (60, 5)
        edge.wait_projected(client, sale, ["o1"])
        me = edge.auth(f"buyer-{uid}")

        def accepted_order() -> str:
            posted = client.post(f"{edge.url}/v1/sales/{sale}/intents",
                                 json={"sku": "o1", "quantity": 1}, headers=me)  # fmt: skip
            assert posted.status_code == 202, posted.text
            url = posted.json()["status_url"]

            def decided() -> dict | None:
                status = client.get(edge.url + url, headers=me).json()
                return status if status["status"] == "accepted" else None

            status = wait_for(decided, 30)
            assert status, "the intent was not accepted"
            return str(status["order_id"])

        paid_order, cancelled_order = accepted_order(), accepted_order()
        pay = client.post(f"{edge.url}/v1/orders/{paid_order}/pay", headers={**me,
                          "Idempotency-Key": "pay-1"})  # fmt: skip
        assert pay.status_code == 202, pay.text
        again = client.post(f"{edge.url}/v1/orders/{paid_order}/pay", headers={**me,
                            "Idempotency-Key": "pay-1"})  # fmt: skip
        assert again.json()["attempt_id"] == pay.json()["attempt_id"]  # the same attempt
        other = client.post(f"{edge.url}/v1/orders/{paid_order}/pay",
                            headers=edge.auth(f"thief-{uid}"))  # fmt: skip
        assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
        missing = client.post(f"{edge.url}/v1/orders/ord-{uuid.uuid4().hex}/pay", headers=me)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_order"
        cancel = client.post(f"{edge.url}/v1/orders/{cancelled_order}/cancel", headers=me)
        assert cancel.status_code == 202, cancel.text
    pipeline = edge.pipeline
    facts = follow_sale(pipeline.endpoints.bootstrap, pipeline.names.decisions, sale,
                        lambda fs: counted("OrderPaid", 1)(fs) and counted("HoldCancelled", 1)(fs),
                        timeout=60)  # fmt: skip
    names = [n for n, _ in facts]
    assert names.count("PaymentStarted") == 1  # one attempt, however often it was asked
    assert [r["order_id"] for n, r in facts if n == "OrderPaid"] == [paid_order]
    cancelled = [r for n, r in facts if n == "HoldCancelled"]
    assert [(r["order_id"], r["remaining"]) for r in cancelled] == [(cancelled_order, 4)]


def test_the_operator_pauses_adds_units_and_cancels_and_the_owner_hears_every_order_step(
    edge: EdgeUnderTest, payments: Service, uid: str
) -> None:
    sale = f"ops-{uid}"
    admin = edge.auth("adm", "admin")
    buyer, late = edge.auth(f"buyer-{uid}"), edge.auth(f"late-{uid}")
    with httpx.Client(timeout=15) as client:
        body = {"sale_id": sale, "skus": [{"sku": "p1", "allocation": 1, "per_user_limit": 1,
                "per_order_max": 1}], "starts_in_s": -1, "duration_s": 600,
                "hold_s": 60}  # fmt: skip
        assert (
            client.post(f"{edge.url}/v1/admin/sales", json=body, headers=admin).status_code == 201
        )
        edge.wait_projected(client, sale, ["p1"])

        def post(me: dict[str, str]) -> str:
            resp = client.post(f"{edge.url}/v1/sales/{sale}/intents",
                               json={"sku": "p1", "quantity": 1}, headers=me)  # fmt: skip
            assert resp.status_code == 202, resp.text
            return str(resp.json()["status_url"])

        def status(url: str, me: dict[str, str], want: str) -> dict | None:
            got = client.get(edge.url + url, headers=me).json()
            return got if got["status"] == want else None

        def admin_post(what: str, json: dict | None = None) -> httpx.Response:
            return client.post(f"{edge.url}/v1/admin/sales/{sale}/{what}", json=json,
                               headers=admin)  # fmt: skip

        with sse_events(edge.url + "/v1/me/events", buyer) as events:
            first = post(buyer)
            won = wait_for(lambda: status(first, buyer, "accepted"), 30)
            assert won, "the first intent was not accepted"
            pay = client.post(f"{edge.url}/v1/orders/{won['order_id']}/pay", headers=buyer)
            assert pay.status_code == 202, pay.text
            steps = []
            while len(steps) < 3 and (event := next_event(events, 30)) is not None:
                steps.append((event["event"], event["status"]))
            assert steps == [("intent", "accepted"), ("order", "paying"), ("order", "paid")]

            # Bad operator requests change nothing and say why.
            bad = admin_post("units", {"sku": "p1", "quantity": 0})
            assert bad.status_code == 422, bad.text
            nope = client.post(f"{edge.url}/v1/admin/sales/no-{uid}/pause", headers=admin)
            assert nope.status_code == 404 and nope.json()["error"]["code"] == "unknown_sale"
            shopper = client.post(f"{edge.url}/v1/admin/sales/{sale}/cancel", headers=buyer)
            assert shopper.status_code == 403

            paused = admin_post("pause")
            assert paused.status_code == 202 and paused.json()["skus"] == ["p1"]
            waiting = post(late)
            assert wait_for(lambda: status(waiting, late, "paused"), 30), "not told it waits"
            state = wait_for(lambda: (s := client.get(f"{edge.url}/v1/sales/{sale}").json())
                             ["skus"][0]["state"] == "paused" and s, 30)  # fmt: skip
            assert state, "the sale never showed paused"
            added = admin_post("units", {"sku": "p1", "quantity": 1, "ref": f"more-{uid}"})
            assert added.status_code == 202 and added.json()["ref"] == f"more-{uid}"
            assert admin_post("resume").status_code == 202
            assert wait_for(lambda: status(waiting, late, "accepted"), 30), "not decided"
            cancelled = admin_post("cancel", {"reason": "mispriced"})
            assert cancelled.status_code == 202, cancelled.text
            refund = next_event(events, 30)
        assert refund is not None and (refund["event"], refund["status"]) == ("order", "refunded")
        assert refund["order_id"] == won["order_id"]
        ended = wait_for(lambda: (s := client.get(f"{edge.url}/v1/sales/{sale}").json())
                         ["skus"][0]["state"] == "ended" and s, 30)  # fmt: skip
        assert ended and ended["skus"][0]["allocation"] == 2  # 1 + 1 added
