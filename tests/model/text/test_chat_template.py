"""Chat templates render as Hugging Face's `apply_chat_template(tokenize=False)` renders them, inside a
sandbox that refuses Python internals; template errors are ValueErrors."""
from __future__ import annotations

import pytest

from model.text.chat_template import ChatTemplate
from tests.default_model import builtin_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "ünïcödé 😀"}, {"role": "user", "content": "  spaces  "},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}],
    [{"role": "system", "content": "You write code."}, {"role": "user", "content": "def f():\n\treturn 1"},
     {"role": "assistant", "content": "```python\nprint('<|im_end|>')\n```"}, {"role": "user", "content": "{{ x }}"},
     {"role": "assistant", "content": "ok"}],
]

# exercises the environment beyond SmolLM2's template: loop controls, namespace, tojson, generation
# blocks, raise_exception in a branch not taken, special-token variables, whitespace control
RICH_TEMPLATE = """{{ bos_token }}{% set ns = namespace(count=0) %}
{% for message in messages %}
  {% if message['role'] == 'system' %}{% continue %}{% endif %}
  {% set ns.count = ns.count + 1 %}
  {% if message['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
  [{{ ns.count }}] {{ message['role'] | upper }}: {{ message['content'] | trim }}
  {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}
  {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
meta={{ {'n': messages | length, 'ü': 'é'} | tojson }} {{ messages[0] | tojson(indent=2) }}
{%- if add_generation_prompt %}
ASSISTANT:{% endif %}"""


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(builtin_tokenizer().chat_template)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_rendering_equals_hugging_face(template, hf_tokenizer, index, add_generation_prompt):
    messages = CONVERSATIONS[index]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_smollm2_template_text(template):
    text = template.render([{"role": "user", "content": "What is the capital of France?"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", [2, 4])
def test_rich_template_equals_hugging_face(hf_tokenizer, index, add_generation_prompt):
    messages = CONVERSATIONS[index]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=RICH_TEMPLATE, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    ours = ChatTemplate(RICH_TEMPLATE, bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token)
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'content': 'changed'}) }}",
])
def test_sandbox_refuses_python_internals_and_mutation(source):
    """Unsafe attributes are undefined (they print as nothing, and calling them is an error); calls
    that would mutate the inputs are refused."""
    messages = [{"role": "user", "content": "x"}]
    try:
        text = ChatTemplate(source).render(messages)
    except ValueError as exc:
        assert "sandbox" in str(exc) or "template" in str(exc)
    else:
        assert text == ""
    assert messages == [{"role": "user", "content": "x"}]


def test_template_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ValueError, match="only user"):
        ChatTemplate("{{ raise_exception('only user messages') }}").render([])
    with pytest.raises(ValueError, match="chat template error"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        ChatTemplate("  ")
    with pytest.raises(ValueError, match="does not exist"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")


def test_from_file_defaults_and_extra_variables(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ bos_token }}{{ messages | length }}{{ tools | tojson if tools else '' }}"
                    "{{ strftime_now('%Y') | length }}", encoding="utf-8")
    template = ChatTemplate.from_file(path, bos_token="<s>")
    assert template.render([{"role": "user", "content": "x"}]) == "<s>14"
    assert template.render([], tools=[{"name": "f"}], bos_token="") == '0[{"name": "f"}]4'


def test_templates_read_the_tokenizers_bos_and_eos_as_text():
    """A --chat-template written for Hugging Face reads bos_token/eos_token, which serving passes."""
    from server.executor.build import special_token_texts
    texts = special_token_texts(builtin_tokenizer())
    assert texts == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
                            **texts)
    assert template.render([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"
