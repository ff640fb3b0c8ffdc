"""Fixtures of the API tests: one tiny random CustomLLM checkpoint and a real uvicorn server over it
(per test module), and an `openai` client for it. Modules that need another model define their own
`server`."""
from __future__ import annotations

import openai
import pytest

from tests.api_server import InProcessServer, make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def server(model_dir):
    with InProcessServer(model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
