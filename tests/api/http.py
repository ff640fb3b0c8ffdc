"""Small HTTP helpers the API tests share: requests, SSE lines, OpenAI error shapes, metric values."""
from __future__ import annotations

import httpx


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
    """The value of one Prometheus series in a scrape (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
