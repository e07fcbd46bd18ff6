"""A downstream team's consumer group on our topics: two fulfilment instances share the
decisions topic's partitions and record every paid order exactly once, across a SIGKILL of
one of them between its sink's commit and its offsets' commit (the batch is redelivered)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from flashsale.fairness import counted, follow_sale
from flashsale.settings import Settings
from infra import processes
from infra.stack import Endpoints
from producers.commands import SkuAllocation
from tests.conftest import local_only
from tests.integration.pipeline import Pipeline, partition_of, with_payments

pytestmark = pytest.mark.slow
ORDERS, CRASH_AFTER = 60, 5


@pytest.fixture(scope="module")
def pipeline(settings: Settings, endpoints: Endpoints) -> Iterator[Pipeline]:
    local_only(settings)
    with with_payments(settings, endpoints, "down" + uuid.uuid4().hex[:6], 0) as p:
        yield p


def _one_sku_per_partition(partitions: int) -> list[str]:
    by_partition: dict[int, str] = {}
    while len(by_partition) < partitions:
        sku = f"sku-down-{uuid.uuid4().hex[:8]}"
        by_partition.setdefault(partition_of(sku, partitions), sku)
    return [by_partition[n] for n in range(partitions)]


def _shares(log: Path) -> bool:
    """Whether the instance's latest assignment (its log) holds some partitions."""
    lines = [ln for ln in log.read_text().splitlines() if '"fulfilment.assigned"' in ln]
    return bool(lines) and '"partitions": []' not in lines[-1]


def _instance(p: Pipeline, name: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    full = {**os.environ, **p.env, "FLASHSALE_NAMESPACE": p.settings.namespace,
            "FLASHSALE_STATE_DIR": str(p.settings.state_dir), **env}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "flashsale.cli", "fulfilment", "--instance",
                             name], env=full, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def test_two_instances_record_every_paid_order_exactly_once_across_a_sigkill(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    p = pipeline
    sale = f"down-{uuid.uuid4().hex[:6]}"
    skus = _one_sku_per_partition(p.settings.partitions)  # every instance gets paid orders
    producer = p.producer()
    now = int(time.time() * 1000)
    producer.open_sale(sale, [SkuAllocation(s, ORDERS, 1, 1) for s in skus], now - 1_000,
                       now + 3_600_000, hold_ms=600_000)  # fmt: skip
    crashing = _instance(p, "a", tmp_path / "a.log",
                         FLASHSALE_FULFILMENT_CRASH_AFTER=str(CRASH_AFTER))  # fmt: skip
    steady = _instance(p, "b", tmp_path / "b.log")
    restarted: subprocess.Popen[bytes] | None = None
    try:
        shared = lambda: all(_shares(tmp_path / f"{n}.log") for n in "ab")  # noqa: E731
        assert processes.wait_until(shared, 60), "the two instances never shared the partitions"
        users = [(f"buyer-{n}", skus[n % len(skus)]) for n in range(ORDERS)]
        producer.wait([producer.submit_intent(sale, sku, u, 1, "k")[1] for u, sku in users])
        facts = follow_sale(p.endpoints.bootstrap, p.names.decisions, sale,
                            counted("IntentAccepted", ORDERS), timeout=60)  # fmt: skip
        for _, r in [f for f in facts if f[0] == "IntentAccepted"]:
            attempt = "att-" + r["order_id"]
            producer.order_command("StartPayment", sale, r["sku"], order_id=r["order_id"],
                                   user_id=r["user_id"], attempt_id=attempt)  # fmt: skip
        facts = follow_sale(p.endpoints.bootstrap, p.names.decisions, sale,
                            counted("OrderPaid", ORDERS), timeout=60)  # fmt: skip
        paid = {r["order_id"] for n, r in facts if n == "OrderPaid"}
        assert len(paid) == ORDERS
        # The crashing instance kills itself once it recorded its share: rows in, offsets not.
        assert processes.wait_until(lambda: crashing.poll() is not None, 60), (
            tmp_path / "a.log"
        ).read_text()[-3000:] + (tmp_path / "b.log").read_text()[-3000:]
        assert crashing.returncode == -9  # SIGKILL, as the fault says
        restarted = _instance(p, "a2", tmp_path / "a2.log")

        def rows() -> list[tuple[str, str, int]]:
            with psycopg.connect(p.endpoints.dsn) as conn:
                return conn.execute(
                    "SELECT order_id, recorded_by, deliveries FROM fulfilment_orders"
                    " WHERE namespace = %s AND sale_id = %s",
                    (p.settings.namespace, sale)).fetchall()  # fmt: skip

        # The killed batch comes again to whoever takes its partitions (after the group's
        # session timeout): the fault really hit, and the sink absorbs it.
        redelivered = lambda: sum(d for _, _, d in rows()) > ORDERS  # noqa: E731
        logs = lambda: "".join((tmp_path / f"{n}.log").read_text()[-2500:]  # noqa: E731
                               for n in ("a", "b", "a2"))  # fmt: skip
        assert processes.wait_until(redelivered, 60), logs()
        time.sleep(1.0)  # anything else redelivered lands as a delivery, never a row
        got = rows()
        assert sorted(o for o, _, _ in got) == sorted(paid)  # every paid order, once
        by = {who for _, who, _ in got}
        assert "a" in by and by & {"b", "a2"}, by  # the partitions were shared

    finally:
        for proc in (crashing, steady, restarted):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(15)
