"""From a chat request to what the engine runs: the messages and tools through the chat template,
the prompt ids, the grammar (tool calls forced by `tool_choice`, or `response_format`, or
`structured_outputs`) compiled before admission, and the sampling parameters. Shared by
/v1/chat/completions and /v1/responses (which is translated to a chat request first)."""
from __future__ import annotations

from dataclasses import dataclass

from server.api.errors import ApiError
from server.api.prompts import encode, render_chat, resolve_max_tokens
from server.api.schemas import ChatCompletionRequest
from server.api.structured import compile_grammar, response_format_spec, structured_outputs_spec
from server.api.tools import ToolPlan, template_messages
from server.config import ApiConfig
from server.engine.request import SamplingParams


@dataclass
class PreparedChat:
    prompt_ids: list[int]
    params: SamplingParams
    tools: ToolPlan


def template_inputs(engine, body: ChatCompletionRequest, plan: ToolPlan) -> tuple[list[dict], dict]:
    """The messages and extra variables the chat template renders."""
    template = engine.chat_template
    takes_tools = template is not None and template.takes("tools")
    extra = {}
    if plan.active and takes_tools:
        extra["tools"] = plan.openai_tools()
    if body.reasoning_effort is not None:
        if template is None or not template.takes("reasoning_effort"):
            raise ApiError(400, "reasoning_effort: this model does not reason (its chat template takes no "
                                "reasoning_effort)", param="reasoning_effort", code="unsupported_parameter")
        extra["reasoning_effort"] = body.reasoning_effort
    return template_messages(body.messages, plan, takes_tools), extra


async def prepare_chat(engine, body: ChatCompletionRequest, api: ApiConfig, logprobs: int | None) -> PreparedChat:
    """Checks, prompt ids, compiled grammar and sampling parameters of a chat request (ApiError on
    anything that cannot be served)."""
    body.check(api)
    plan = ToolPlan.of(body.tools, body.tool_choice, body.parallel_tool_calls)
    messages, extra = template_inputs(engine, body, plan)
    prompt_ids = await encode(engine, render_chat(engine, messages, body.add_generation_prompt, **extra), "messages")
    if (spec := plan.grammar_spec()) is not None:
        param = "tools"
    elif (spec := response_format_spec(body.response_format)) is not None:
        param = "response_format"
    else:
        spec, param = structured_outputs_spec(body.structured_outputs), "structured_outputs"
    grammar = await compile_grammar(engine, spec, api.grammar_compile_timeout_s, param)
    max_tokens = resolve_max_tokens(body, len(prompt_ids), engine, api)
    return PreparedChat(prompt_ids, body.sampling_params(max_tokens, logprobs, grammar), plan)
