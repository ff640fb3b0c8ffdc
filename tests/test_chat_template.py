"""Chat templates: the GGUF's template renders as Hugging Face renders it, inside a sandbox."""
from __future__ import annotations

import os

import pytest

from model.builtin import builtin_model_path
from model.chat_template import ChatTemplate
from model.tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "ünïcödé 😀"}, {"role": "user", "content": "  spaces  "},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}],
]


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(load_tokenizer(builtin_model_path()).chat_template)


@pytest.fixture(scope="module")
def hf_tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    path = builtin_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_rendering_equals_hugging_face(template, hf_tokenizer, index, add_generation_prompt):
    messages = CONVERSATIONS[index]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_sandbox_refuses_python_internals():
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="sandbox|template"):
        evil.render([{"role": "user", "content": "x"}])


def test_template_errors_are_value_errors():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ValueError, match="only user"):
        ChatTemplate("{{ raise_exception('only user messages') }}").render([])
