"""Small HTTP helpers the API tests share: requests, SSE lines, OpenAI error shapes, metric values."""
from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families


def post(srv, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, timeout=60, **kwargs)


def sse_events(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param


def scrape(srv) -> str:
    return httpx.get(f"{srv.url}/metrics", timeout=30).text


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of the samples named `name` in a scrape whose labels include `labels` (written as
    `'{key="value",…}'`; every series also has a `model_name` label), 0 when there is none."""
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and wanted.items() <= sample.labels.items():
                total += sample.value
    return total
