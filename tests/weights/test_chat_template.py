"""render_chat against transformers' apply_chat_template, the fallback, and hostile templates.

Every hostile template must end in one TemplateError line within a few seconds
(the default time limit is 2 s), without a memory spike, and leave the
caller's trace function in place.
"""

from __future__ import annotations

import sys
import time

import pytest
from transformers import AutoTokenizer

from tandem.errors import GGUFError, TemplateError
from tandem.weights.chat_template import FALLBACK_CHAT_TEMPLATE, TemplateLimits, chat_template_of, render_chat
from tandem.weights.gguf_file import read_metadata

CONVERSATIONS = {
    "system and several turns": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And in binary?"},
    ],
    "no system": [{"role": "user", "content": "写一个快速排序函数。"}],
    "ends with the assistant": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!\n\n```python\nprint('hi')\n```"},
    ],
    "tool call and result": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "sunny, 21 C"},
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    """(chat template from the file, transformers' tokenizer for the same file)."""
    template, is_fallback = chat_template_of(read_metadata(qwen_gguf))
    assert not is_fallback
    return template, AutoTokenizer.from_pretrained(str(qwen_gguf.parent), gguf_file=qwen_gguf.name)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen_template_matches_transformers(qwen, name, generation_prompt):
    template, reference = qwen
    messages = CONVERSATIONS[name]
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    ours = render_chat(
        template,
        messages,
        add_generation_prompt=generation_prompt,
        bos_token=reference.bos_token,
        eos_token=reference.eos_token,
    )
    assert ours == expected


def test_qwen_template_with_tools_matches_transformers(qwen):
    template, reference = qwen
    messages = CONVERSATIONS["tool call and result"]
    expected = reference.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert render_chat(template, messages, tools=TOOLS) == expected


def test_fallback_when_the_file_has_no_template(gemma_gguf):
    template, is_fallback = chat_template_of(read_metadata(gemma_gguf))
    assert is_fallback and template == FALLBACK_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}, {"type": "image"}]},
        {"role": "user", "content": "Bye"},
    ]
    expected = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"
    assert render_chat(None, messages) == expected
    assert render_chat(template, messages, add_generation_prompt=False) == expected.removesuffix("Assistant:")


def test_chat_template_of_validates_metadata():
    assert chat_template_of({}) == (FALLBACK_CHAT_TEMPLATE, True)
    assert chat_template_of({"tokenizer.chat_template": "  \n"}) == (FALLBACK_CHAT_TEMPLATE, True)
    assert chat_template_of({"tokenizer.chat_template": "{{ 1 }}"}) == ("{{ 1 }}", False)
    with pytest.raises(GGUFError):
        chat_template_of({"tokenizer.chat_template": ["not", "a", "string"]})


CUSTOM_TEMPLATES = {
    "layout and loop controls": (
        "{% for m in messages %}\n"
        "    {%- if loop.index > 2 %}{% break %}{% endif %}\n"
        "    {{ m.role }}: {{ m.content }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}  next\n{% endif %}"
    ),
    "tojson": "{{ messages | tojson }}|{{ {'b': [1, 2], 'a': '<é>'} | tojson(indent=2, sort_keys=true) }}",
    "namespace and dict": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content | length %}"
        "{% endfor %}{{ ns.n }} {{ dict(a=1, b=2) | dictsort }} {{ messages[0].keys() | list }}"
    ),
    "special tokens and extras": "{{ bos_token }}{{ messages[-1].content }}{{ eos_token }}{{ flavour }}",
    "generation tag": "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}",
    "string methods": "{{ messages[0].content.upper().split() | join('-') }} {{ '%s=%d' % ('n', 3) }}",
}


@pytest.mark.parametrize("name", list(CUSTOM_TEMPLATES))
def test_environment_renders_like_transformers(qwen, name):
    _, reference = qwen
    messages = [
        {"role": "user", "content": "<b>héllo</b> there", "name": None},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "more"},
    ]
    template = CUSTOM_TEMPLATES[name]
    expected = reference.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, flavour="mint"
    )
    ours = render_chat(
        template, messages, bos_token=reference.bos_token, eos_token=reference.eos_token, flavour="mint"
    )
    assert ours == expected


def test_missing_special_tokens_print_as_nothing():
    assert render_chat("[{{ bos_token }}{{ eos_token }}]", [], bos_token=None, eos_token=None) == "[]"


def test_strftime_now():
    assert render_chat("{{ strftime_now('%Y-%m-%d') }}", []) == time.strftime("%Y-%m-%d")


HOSTILE = {
    "syntax error": "{% for x in %}{% endfor %}",
    "unclosed block": "{% if messages %}",
    "raise_exception": "{{ raise_exception('Only user and assistant roles are supported!') }}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops printing": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "string repetition": "{{ 'x' * 10**9 }}",
    "list repetition": "{{ ([0] * 10**9) | length }}",
    "huge power": "{{ 2 ** (10 ** 8) }}",
    "repeated squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "class access": "{{ ''.__class__.__mro__ }}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "macro internals": "{% macro m() %}{% endmacro %}{{ m._func.__globals__ }}",
    "namespace dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro fan-out": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "concatenation doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    ),
    "shared-reference doubling": (
        "{% set ns = namespace(x=['abc']) %}{% for i in range(64) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}"
    ),
    "deep nesting": "{% set ns = namespace(x=1) %}{% for i in range(100000) %}{% set ns.x = (ns.x,) %}{% endfor %}",
    "padding filter": "{{ 'x' | center(1000000000) }}",
    "padding method": "{{ 'x'.ljust(10**9) }}",
    "printf width": "{{ '%1000000000s' % 'x' }}",
    "format width": "{{ '{:>{}}'.format('x', 10**9) }}",
    "replace blow-up": "{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}",
    "join blow-up": "{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s] | join }}",
    "tojson indent": "{{ messages | tojson(indent=100000000) }}",
    "batch fill": "{{ [1] | batch(1000000000, fill_with='x') | list }}",
    "output cap": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "type error": "{{ messages + 1 }}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_fails_cleanly(name):
    previous = sys.gettrace()
    start = time.monotonic()
    with pytest.raises(TemplateError) as caught:
        render_chat(HOSTILE[name], [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert message.startswith("chat template") and "\n" not in message and len(message) < 400
    assert sys.gettrace() is previous


def test_error_messages_say_what_happened():
    def error(template: str, **kwargs) -> str:
        with pytest.raises(TemplateError) as caught:
            render_chat(template, [], **kwargs)
        return str(caught.value)

    assert "syntax error on line 2" in error("ok\n{% for %}")
    assert error("{{ raise_exception('No tools, please.') }}").endswith("No tools, please.")
    assert "unsafe" in error("{{ ''.__class__ }}")
    assert "longer than 0.2 s" in error(
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        limits=TemplateLimits(time_s=0.2),
    )
    assert "longer than 10 characters" in error(
        "{{ 'abcdef' ~ 'ghijkl' }}{{ x }}", x="y" * 20, limits=TemplateLimits(max_output_chars=10)
    )


def test_time_limit_restores_the_callers_tracer():
    calls = []

    def outer_tracer(frame, event, arg):
        calls.append(event)

    sys.settrace(outer_tracer)
    try:
        with pytest.raises(TemplateError):
            render_chat(
                "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                [],
                limits=TemplateLimits(time_s=0.2),
            )
        assert sys.gettrace() is outer_tracer
    finally:
        sys.settrace(None)


def test_legitimate_large_and_numeric_content_renders():
    big = "word " * 200_000  # a 1 MB document in one message
    out = render_chat(None, [{"role": "user", "content": big}])
    assert out == f"User: {big}\n\nAssistant:"
    assert render_chat("{{ '{}'.format(1700000000) }} {{ '%05d' % 42 }} {{ 10 ** 300 > 0 }}", []) == (
        "1700000000 00042 True"
    )


def test_messages_must_be_plain_data():
    with pytest.raises(TemplateError):
        render_chat(None, "hello")
    with pytest.raises(TemplateError):
        render_chat(None, [{"role": "user", "content": object()}])
    with pytest.raises(TemplateError):
        render_chat(42, [])
