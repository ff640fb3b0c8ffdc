"""Chat templates: jinja2 rendered in an immutable sandbox, with the environment Hugging Face's
`apply_chat_template` gives a template (trim_blocks, lstrip_blocks, loop controls, a `{% generation %}`
block, `raise_exception`, `strftime_now`, a non-escaping `tojson`), so a model's template renders here
exactly as it does there. Templates come from model files and are untrusted code: the sandbox refuses
access to Python internals, and every template error becomes a ValueError with the reason."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks the assistant's part for training masks; when
    rendering a prompt it is just its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller) -> str:
        return caller()


class SafeNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names, so a template cannot plant dunders."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template may not set {name!r} on a namespace")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=SafeNamespace)
    return env


class ChatTemplate:
    """A compiled chat template. `defaults` are variables every rendering sees unless `render` passes
    its own (e.g. `bos_token`, `eos_token`, which Hugging Face passes from the tokenizer)."""

    def __init__(self, source: str, **defaults: Any):
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the chat template is empty")
        self.source = source
        self.defaults = defaults
        try:
            environment = _environment()
            self.template = environment.from_string(source)
            self.variables = frozenset(jinja2.meta.find_undeclared_variables(environment.parse(source)))
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template does not compile: {exc}") from None

    def takes(self, variable: str) -> bool:
        """Whether the template reads this variable (e.g. `tools`, `reasoning_effort`), given or not."""
        return variable in self.variables

    @classmethod
    def from_file(cls, path: str | Path, **defaults: Any) -> "ChatTemplate":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"chat template file {path} does not exist")
        return cls(path.read_text(encoding="utf-8"), **defaults)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `messages` ({"role", "content", …} dicts); `extra` (tools, documents,
        anything the template reads) is passed to the template as variables."""
        context = {**self.defaults, **extra}
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.SecurityError as exc:
            raise ValueError(f"the chat template tried something the sandbox forbids: {exc}") from None
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"chat template error: {type(exc).__name__}: {exc}") from None
