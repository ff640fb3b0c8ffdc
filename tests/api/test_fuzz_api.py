"""Fuzz: schemathesis over the server's whole OpenAPI schema, bounded in examples and time. No
response may be a 5xx, none may hang, and the server is healthy with its cache intact afterwards."""
from __future__ import annotations

import time

import httpx
import pytest

from server.config import ApiConfig
from tests.api_server import InProcessServer, make_tiny_checkpoint

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

EXAMPLES_PER_OPERATION = 20
BUDGET_SECONDS = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz-model"))
    with InProcessServer(model_dir, api=ApiConfig(max_tokens_limit=64)) as srv:
        yield srv


def test_no_5xx_and_no_hang_over_the_whole_schema(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    deadline = time.monotonic() + BUDGET_SECONDS
    failures: list[str] = []
    calls = 0
    for operation in operations:
        if time.monotonic() > deadline:
            break

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy())
        def probe(case):
            nonlocal calls
            calls += 1
            response = case.call(base_url=server.url, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        probe()
    assert calls > 50
    assert not failures, failures[:5]
    assert httpx.get(f"{server.url}/health").status_code == 200
    server.settle()
