"""LangChain's OpenAI integration against a real server: `with_structured_output` (JSON schema and
function calling) returns instances of the Pydantic model, `bind_tools` returns tool calls whose
arguments match the tool's schema, invoked and streamed."""
from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")
from langchain_core.tools import tool  # noqa: E402


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12, description="the city")
    conditions: Literal["sunny", "rain", "snow"]
    temperature: int = Field(ge=-50, le=60)


class WeatherArgs(BaseModel):
    city: str = Field(max_length=12)          # bounded: the random test model would fill any budget
    unit: Literal["celsius", "fahrenheit"]


@tool(args_schema=WeatherArgs)
def get_weather(city: str, unit: str) -> str:
    """Get the weather in a city."""
    return f"21 {unit} in {city}"


@pytest.fixture(scope="module")
def llm(long_server):
    return langchain_openai.ChatOpenAI(base_url=f"{long_server.url}/v1", api_key="none", max_retries=0,
                                       model=long_server.engine.model_name, temperature=1.0, max_tokens=160)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm, method):
    structured = llm.with_structured_output(Weather, method=method)
    for _ in range(2):
        assert isinstance(structured.invoke("What is the weather in Paris?"), Weather)


def test_bind_tools_invoke_and_stream(llm):
    bound = llm.bind_tools([get_weather], tool_choice="any")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    for call in message.tool_calls:
        assert set(call["args"]) == {"city", "unit"} and call["args"]["unit"] in ("celsius", "fahrenheit")
        assert call["id"].startswith("call_")
    chunks = list(bound.stream("What is the weather in Paris?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "get_weather"
    assert set(merged.tool_calls[0]["args"]) == {"city", "unit"}
    named = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Paris?")
    assert [c["name"] for c in named.tool_calls][:1] == ["get_weather"]
