"""Fuzz the edge from its own OpenAPI document: no 5xx, answers conform, rejects write nothing."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.harness import EdgeUnderTest, purchase_intents, start_edge
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
STREAMS = {"/v1/me/events", "/v1/sales/{sale_id}/events"}


@pytest.fixture(scope="module")
def fuzz_edge(pipeline: Pipeline) -> Iterator[EdgeUnderTest]:
    """One app server (no nginx in the way of its answers) with a generous rate limit."""
    e = start_edge(
        pipeline, servers=1, FLASHSALE_RATE_PER_S="100000", FLASHSALE_RATE_BURST="100000"
    )
    yield e
    e.edge.down()


def _aim_at(sku: str):
    def aim(case: schemathesis.Case) -> schemathesis.Case:
        if isinstance(case.body, dict):
            case.body["sku"] = sku
        return case

    return aim


def test_fuzz_the_public_contract(fuzz_edge: EdgeUnderTest, uid: str):
    base = fuzz_edge.edge.servers[0].url
    sale = f"fuzz-{uid}"
    with httpx.Client(timeout=15) as client:
        terms = {"sku": "k1", "allocation": 10**6, "per_user_limit": 10**6, "per_order_max": 3}
        fuzz_edge.open_sale(client, sale, [terms])
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    headers = fuzz_edge.auth(f"fuzzer-{uid}")
    accepted: set[str] = set()
    calls = 0
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in STREAMS:
            continue
        params = {"sale_id": sale} if "{sale_id}" in operation.path else None
        strategies = [
            operation.as_strategy(mode, path_parameters=params)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
        if params:  # also fuzz the path itself
            strategies.append(operation.as_strategy(GenerationMode.POSITIVE))
        if operation.path.endswith("/intents"):  # aim at the real SKU to reach the write path
            strategies.append(strategies[0].map(_aim_at("k1")))

        writes = operation.path.endswith("/intents")
        for strategy in strategies:

            @settings(max_examples=12, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                merged = {**(case.headers or {}), **headers}
                response = case.call(base_url=base, headers=merged, timeout=15)
                case.validate_response(response, checks=CHECKS, headers=merged)
                statuses[response.status_code] += 1
                if response.status_code == 202 and writes:  # noqa: B023 (run() is called right away)
                    accepted.add(response.json()["intent_id"])

            # Unsatisfiable: nothing to negate in this operation (e.g. no parameters).
            with contextlib.suppress(Unsatisfiable):
                run()
    print("fuzz statuses:", dict(statuses))
    assert calls >= 100 and accepted, "the fuzzer must reach the write path"
    bootstrap, topic = fuzz_edge.pipeline.endpoints.bootstrap, fuzz_edge.pipeline.names.sku_commands
    written = {r["intent_id"] for r in purchase_intents(bootstrap, topic, sale)}
    assert written == accepted, "every intent in the topic is one the fuzzer got a 202 for"
