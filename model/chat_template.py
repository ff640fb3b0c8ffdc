"""Chat templates rendered with jinja2 in a sandbox, as Hugging Face renders them."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplate:
    def __init__(self, source: str):
        self.source = source

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                                            undefined=jinja2.Undefined)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template does not compile: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ChatTemplate":
        return cls(Path(path).read_text())

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        except jinja2.exceptions.SecurityError as exc:
            raise ValueError(f"the chat template tried something the sandbox forbids: {exc}") from None
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from None


def _tojson(value, indent=None):
    import json
    return json.dumps(value, ensure_ascii=False, indent=indent)
