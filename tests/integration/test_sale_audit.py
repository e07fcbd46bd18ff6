"""`flashsale audit sale`: passes a clean sale, fails each forged violation in a copy of its topics.

A forgery is a copy of the sale's three topics (commands, decisions, dead letters) into a
namespace of its own, record by record with the same partition, key and headers, where one
decision was changed, added or left out. The unchanged copy must pass: the copying itself
adds nothing the audit could object to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from flashsale import input_audit
from flashsale.sale_audit import audit_sale
from flashsale.settings import Settings
from flashsale.topics import TopicNames, catalogue
from infra import provision
from infra.stack import Endpoints
from processors.core import CURRENT_RULES, RULES
from producers.commands import SkuAllocation
from producers.identity import intent_id_for
from schemas.codec import SchemaRegistry
from tests.conftest import local_only
from tests.integration.pipeline import Pipeline, start_pipeline

pytestmark = pytest.mark.slow

Decision = tuple[str, dict[str, Any]]  # (record name, record): a decision or another fact
Forge = Callable[[list[Decision]], list[Decision]]


@pytest.fixture(scope="module")
def sale(settings: Settings, endpoints: Endpoints) -> Iterator[tuple[Pipeline, str]]:
    """A decided sale: 20 units, one per user, 60 users asking, 6 retries; a progress fact
    after every 8th event (and after the 20th unit went, event #21)."""
    local_only(settings)
    p = start_pipeline(settings, endpoints, uuid.uuid4().hex[:8])
    try:
        sale_id, sku = f"audit-{uuid.uuid4().hex[:6]}", f"sku-audit-{uuid.uuid4().hex[:6]}"
        p.open_sale(sale_id, [SkuAllocation(sku, 20, 1, 1)], progress_every=8)
        producer = p.producer()
        sends = [(f"u{i}", f"k{i}") for i in range(60)]
        futures = [producer.submit_intent(sale_id, sku, u, 1, k)[1] for u, k in sends + sends[:6]]
        producer.wait(futures)
        audit = p.audit(sale_id)
        missing = audit.wait_for({intent_id_for(u, sale_id, sku, k) for u, k in sends}, 120)
        audit.close()
        assert missing == set()
        yield p, sale_id
    finally:
        p.stop()


def test_a_clean_sale_passes_with_its_figures(sale: tuple[Pipeline, str]):
    p, sale_id = sale
    audit = audit_sale(p.endpoints.bootstrap, p.names, sale_id)
    assert audit.passed, audit.violations
    [fig] = audit.skus.values()
    assert (fig.allocation, fig.units_sold, fig.accepted, fig.rejected) == (20, 20, 20, 40)
    assert fig.rules_version == CURRENT_RULES
    assert fig.remaining == 0
    assert (audit.decisions, audit.input_offsets, audit.repeats) == (60, 67, 6)  # + SaleOpened
    # 61 events (SaleOpened, then 60 decisions in the order sent: the first 20 accepted).
    facts = input_audit.decode_all(SchemaRegistry.load_default(), input_audit.read_topic(
        p.endpoints.bootstrap, p.names.decisions, True, 30))  # fmt: skip
    progress = [r for _, _, n, r in facts if n == "QueueProgress" and r["sale_id"] == sale_id]
    assert [(r["after_sequence"], r["sold_out"]) for r in progress] == [
        (8, False), (16, False), (21, True), (24, False), (32, False), (40, False), (48, False),
        (56, False)]  # fmt: skip


def test_the_command_prints_json_and_exits_by_verdict(sale: tuple[Pipeline, str]):
    p, sale_id = sale
    env = {**os.environ, **p.env, "FLASHSALE_NAMESPACE": p.settings.namespace}
    cmd = [sys.executable, "-m", "flashsale.cli", "audit", "sale"]
    ok = subprocess.run([*cmd, sale_id, "--json"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert body["verdict"] == "pass" and body["decisions"] == 60 and body["records_per_s"] > 0
    bad = subprocess.run([*cmd, "no-such-sale"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "no-terms" in bad.stdout


def _accepted(ds: list[Decision]) -> list[int]:
    return [i for i, (name, _) in enumerate(ds) if name == "IntentAccepted"]


def _accept_past_allocation(ds: list[Decision]) -> list[Decision]:
    i = next(i for i, (name, _) in enumerate(ds) if name == "IntentRejected")
    template = ds[_accepted(ds)[0]][1]
    rejected = ds[i][1]
    forged = {**template, **{k: rejected[k] for k in ("intent_id", "user_id", "sequence",
                                                      "event_id", "correlation_id")}}  # fmt: skip
    forged["order_id"] = "forged-" + rejected["intent_id"]
    return [*ds[:i], ("IntentAccepted", forged), *ds[i + 1 :]]


def _second_decision(ds: list[Decision]) -> list[Decision]:
    return [*ds, ds[_accepted(ds)[2]]]


def _sequence_gap(ds: list[Decision]) -> list[Decision]:
    last = max(range(len(ds)), key=lambda i: ds[i][1].get("sequence", 0))
    name, rec = ds[last]
    return [*ds[:last], (name, {**rec, "sequence": rec["sequence"] + 1}), *ds[last + 1 :]]


def _user_over_limit(ds: list[Decision]) -> list[Decision]:
    a, b = _accepted(ds)[:2]
    name, rec = ds[b]
    return [*ds[:b], (name, {**rec, "user_id": ds[a][1]["user_id"]}), *ds[b + 1 :]]


def _dropped_decision(ds: list[Decision]) -> list[Decision]:
    i = _accepted(ds)[4]
    return ds[:i] + ds[i + 1 :]


def _progress(ds: list[Decision]) -> list[int]:
    return [i for i, (name, _) in enumerate(ds) if name == "QueueProgress"]


def _dropped_progress(ds: list[Decision]) -> list[Decision]:
    i = _progress(ds)[2]
    return ds[:i] + ds[i + 1 :]


def _progress_elsewhere(ds: list[Decision]) -> list[Decision]:
    i = _progress(ds)[3]  # it names another input record than the one it followed
    name, rec = ds[i]
    return [*ds[:i], (name, {**rec, "input_offset": rec["input_offset"] - 1}), *ds[i + 1 :]]


@pytest.mark.parametrize(
    ("forge", "kinds"),
    [
        (lambda ds: ds, set()),
        (_accept_past_allocation, {"oversell"}),
        (_second_decision, {"second-decision"}),
        (_sequence_gap, {"sequence-gap"}),
        (_user_over_limit, {"user-limit"}),
        (_dropped_decision, {"undecided-intent", "sequence-gap"}),
        (_dropped_progress, {"progress-missing"}),
        (_progress_elsewhere, {"progress-offset"}),
    ],
    ids=[
        "unchanged",
        "accept-past-allocation",
        "second-decision",
        "sequence-gap",
        "user-over-limit",
        "dropped-decision",
        "dropped-progress",
        "progress-elsewhere",
    ],
)
def test_a_forged_copy_fails_naming_the_violation(
    sale: tuple[Pipeline, str], forge: Forge, kinds: set[str]
):
    p, sale_id = sale
    copy = _copy_topics(p, forge)
    try:
        audit = audit_sale(p.endpoints.bootstrap, copy, sale_id)
    finally:
        admin = AdminClient({"bootstrap.servers": p.endpoints.bootstrap, "log_level": 3})
        admin.delete_topics([copy.sku_commands, copy.decisions, copy.dead_letters])
    found = {v.kind for v in audit.violations}
    assert kinds <= found, audit.violations
    assert audit.passed == (not kinds)


def _opened_under(version: int) -> Forge:
    def forge(ds: list[Decision]) -> list[Decision]:
        return [(n, {**r, "rules_version": version} if n == "SaleOpened" else r) for n, r in ds]

    return forge


def test_each_sale_is_audited_under_the_rules_version_it_opened_with(
    sale: tuple[Pipeline, str], monkeypatch: pytest.MonkeyPatch
):
    p, sale_id = sale
    # A later rules version (here: accept whatever is asked) changes nothing for this sale...
    monkeypatch.setitem(RULES, CURRENT_RULES + 1, lambda book, cmd, now: None)
    assert audit_sale(p.endpoints.bootstrap, p.names, sale_id).passed
    # ...but the same decisions claimed to be made under it are not what it would decide.
    copy = _copy_topics(p, _opened_under(CURRENT_RULES + 1))
    try:
        audit = audit_sale(p.endpoints.bootstrap, copy, sale_id)
    finally:
        admin = AdminClient({"bootstrap.servers": p.endpoints.bootstrap, "log_level": 3})
        admin.delete_topics([copy.sku_commands, copy.decisions, copy.dead_letters])
    assert {v.kind for v in audit.violations} == {"rules-mismatch"}, audit.violations


def _copy_topics(p: Pipeline, forge: Forge) -> TopicNames:
    """Copy the namespace's topics into a new one, forging the decisions on the way. The
    copy keeps each command's log time: its command topic stamps the producer's time (the
    original append time, given with each record) instead of its own append time."""
    bootstrap = p.endpoints.bootstrap
    settings = dataclasses.replace(p.settings, namespace=f"t-copy-{uuid.uuid4().hex[:8]}")
    dst = TopicNames.of(settings)
    wanted = {dst.sku_commands, dst.decisions, dst.dead_letters}
    specs = [dataclasses.replace(t, timestamp_type="CreateTime") if t.name == dst.sku_commands
             else t for t in catalogue(settings) if t.name in wanted]  # fmt: skip
    provision.ensure_topics(bootstrap, specs)
    src = p.names
    registry = SchemaRegistry.load_default()
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
    read = input_audit.read_topic
    for topic, to in ((src.sku_commands, dst.sku_commands), (src.dead_letters, dst.dead_letters)):
        for m in read(bootstrap, topic, False, 30):
            producer.produce(to, m.value(), m.key(), partition=m.partition(),
                             headers=m.headers(), timestamp=m.timestamp()[1])  # fmt: skip
    msgs = read(bootstrap, src.decisions, True, 30)
    [(key, partition)] = {(m.key(), m.partition()) for m in msgs}  # the sale's one SKU
    events = [registry.decode(m.value()) for m in msgs]
    for name, rec in forge(events):
        producer.produce(dst.decisions, registry.encode(name, rec), key, partition=partition)
    assert producer.flush(30) == 0
    return dst
