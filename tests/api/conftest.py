"""Fixtures of the API tests: one tiny random CustomLLM checkpoint and a real uvicorn server over it
(per test module), and an `openai` client for it; `long_server` is one with a longer context, shared
by the whole session. Modules that need another model define their own `server`."""
from __future__ import annotations

import pytest

from tests.api_server import InProcessServer, make_tiny_checkpoint, openai_client


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def server(model_dir):
    with InProcessServer(model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="session")
def long_server(tmp_path_factory):
    """The tiny model with a 1,024-token context (tool definitions make long prompts), shared by the
    structured-output, tools and responses tests (constraints hold whatever its random weights) and by
    the default-length test, which needs room for 512 new tokens."""
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-long"), 0, "max_context=1024")
    with InProcessServer(model_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def long_client(long_server):
    return openai_client(long_server)
