"""Structured outputs in the API: what `response_format` (OpenAI) and `structured_outputs` (vLLM's
extra body field) ask for, as a `GrammarSpec`, and compiling it before the request is admitted.

Compiling runs in the engine's grammar executor, off the event loop and off the engine loop, with a
deadline (`--grammar-compile-timeout`): a grammar that is invalid, uses a feature llguidance does not
support, or compiles too slowly is a 400 that names the problem; the engine never waits on it.

Object schemas that list `properties` but say nothing of `additionalProperties` get
`additionalProperties: false` (`strict_schema`), as OpenAI's strict mode requires them to: a sampled
model would otherwise invent keys. What is generated still validates against the schema as given.
"""
from __future__ import annotations

import asyncio
import json

from server.api.errors import ApiError
from server.api.schema_types import ResponseFormat, StructuredOutputs
from server.engine.grammar import GrammarError, GrammarSpec

SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties")


def strict_schema(schema):
    """A copy of `schema` in which every object schema with `properties` and no word on extra keys
    (`additionalProperties`, `patternProperties`, `unevaluatedProperties`) forbids them."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(s) for s in out[key]]
    for key in SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(s) for name, s in out[key].items()}
    for key in SUBSCHEMA_ONE:
        if isinstance(out.get(key), (dict, list)):
            out[key] = strict_schema(out[key])
    if "properties" in out and not any(k in out for k in ("additionalProperties", "patternProperties",
                                                          "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


def json_spec(schema) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(strict_schema(schema), ensure_ascii=False))


def response_format_spec(response_format: ResponseFormat | None) -> GrammarSpec | None:
    """OpenAI's response_format: text (None), json_object (any JSON object), json_schema."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_spec({"type": "object"})
    schema = response_format.json_schema.schema_
    return json_spec({} if schema is None else schema)


def structured_outputs_spec(structured: StructuredOutputs | None) -> GrammarSpec | None:
    """vLLM's structured_outputs: json (a schema, as an object or JSON text), regex, choice, grammar
    (Lark or GBNF), json_object."""
    if structured is None:
        return None
    if structured.json_ is not None:
        schema = structured.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ApiError(400, f"structured_outputs.json is not JSON: {exc}", param="structured_outputs") from None
        return json_spec(schema)
    if structured.regex is not None:
        return GrammarSpec("regex", structured.regex)
    if structured.choice is not None:
        return GrammarSpec("choice", json.dumps(structured.choice, ensure_ascii=False))
    if structured.grammar is not None:
        return GrammarSpec("grammar", structured.grammar)
    return json_spec({"type": "object"})


WHAT = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list", "grammar": "grammar",
        "lark": "tool-call grammar"}


async def compile_grammar(engine, spec: GrammarSpec | None, timeout_s: float, param: str):
    """The compiled grammar for `spec` (None for None); ApiError(400) naming the problem when it
    cannot be compiled, or not within `timeout_s`."""
    if spec is None:
        return None
    compiler = engine.grammars
    what = WHAT[spec.kind]
    future = asyncio.get_running_loop().run_in_executor(compiler.executor, compiler.compile, spec)
    try:
        return await asyncio.wait_for(future, timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(400, f"the {what} did not compile within {timeout_s:g} s (--grammar-compile-timeout); "
                            "simplify it", param=param, code="grammar_too_complex") from None
    except GrammarError as exc:
        raise ApiError(400, f"the {what} cannot be used: {exc}", param=param, code="invalid_grammar") from None
