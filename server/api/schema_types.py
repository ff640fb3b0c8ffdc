"""The building blocks of the request schemas (`schemas.py`, `responses_api.py`): the strict `Schema`
base, valid-Unicode text, and the parts of a request that ask for structured output or tools —
`response_format`, vLLM's `structured_outputs`, tool definitions, `tool_choice`, and the tool calls
of an assistant message in the history. Shapes follow OpenAI's (and vLLM's for
`structured_outputs`); what they mean is in `structured.py` and `tools.py`."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def valid_unicode(text: str) -> str:
    """Text that can be encoded as UTF-8: a lone surrogate (`"\\ud800"` in JSON) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    return text


def function_name(name: str) -> str:
    if not FUNCTION_NAME.fullmatch(name):
        raise ValueError("a function name has 1 to 64 characters among a-z, A-Z, 0-9, _ and -")
    return name


Text = Annotated[str, AfterValidator(valid_unicode)]
FunctionName = Annotated[str, AfterValidator(function_name)]


class Schema(BaseModel):
    """Strict types; unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


# ---- structured output --------------------------------------------------------------------------
class JsonSchemaFormat(Schema):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Schema):
    """OpenAI's `response_format`: text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a json_schema object")
        return self


class StructuredOutputs(Schema):
    """vLLM's `structured_outputs` (extra body): exactly one of a JSON schema, a regex, a list of
    choices, a Lark or GBNF grammar, or any JSON object."""

    json_: Union[dict[str, Any], str, None] = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = Field(default=None, min_length=1)
    grammar: Text | None = None
    json_object: bool | None = None

    def given(self) -> list[str]:
        return [name for name, value in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                         ("grammar", self.grammar), ("json_object", self.json_object or None))
                if value is not None]

    @model_validator(mode="after")
    def _exactly_one(self):
        if len(self.given()) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar and json_object")
        return self


# ---- tools ----------------------------------------------------------------------------------------
class FunctionDefinition(Schema):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Schema):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Schema):
    name: FunctionName


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(Schema):
    name: FunctionName
    arguments: str


class ToolCall(Schema):
    """A tool call of an assistant message in the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
