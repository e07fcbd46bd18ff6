"""Paying and cancelling held orders through nginx and the app servers, end to end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from flashsale.fairness import counted, follow_sale
from infra.services import Service
from tests.e2e.harness import EdgeUnderTest, wait_for
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
        me = edge.auth(f"buyer-{uid}")

        def accepted_order() -> str:
            url = client.post(f"{edge.url}/v1/sales/{sale}/intents", json={"sku": "o1",
                              "quantity": 1}, headers=me).json()["status_url"]  # fmt: skip

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
