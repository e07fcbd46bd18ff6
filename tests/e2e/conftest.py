"""One private pipeline (topics, processor, projector) and one edge for the e2e session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from flashsale.settings import Settings
from infra.stack import Endpoints
from tests.conftest import local_only
from tests.e2e.harness import EdgeUnderTest, start_edge
from tests.integration.pipeline import Pipeline, start_pipeline


@pytest.fixture(scope="session")
def pipeline(settings: Settings, endpoints: Endpoints) -> Iterator[Pipeline]:
    local_only(settings)
    p = start_pipeline(settings, endpoints, "e2e" + uuid.uuid4().hex[:8])
    yield p
    p.stop()


@pytest.fixture(scope="session")
def edge(pipeline: Pipeline) -> Iterator[EdgeUnderTest]:
    e = start_edge(pipeline, servers=2, FLASHSALE_RATE_PER_S="5", FLASHSALE_RATE_BURST="10")
    yield e
    e.edge.down()
