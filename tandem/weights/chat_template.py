"""Render a GGUF's chat template (`tokenizer.chat_template`) into a prompt.

Rendering matches transformers' `apply_chat_template(..., tokenize=False)`:
the same jinja2 environment and the same variables (`messages`, `tools`,
`documents`, `add_generation_prompt`, the special tokens, extra keyword
arguments). The template runs in a sandbox with time and size limits
(`chat_sandbox`, `chat_limits`), and every failure, hostile or merely broken, comes out as
one TemplateError line.

A file without a template (base models such as Gemma 3 270M) gets
FALLBACK_CHAT_TEMPLATE; see docs/chat-templates.md.
"""

from collections.abc import Mapping
from typing import Any

import jinja2

from tandem.errors import GGUFError, TemplateError
from tandem.weights.chat_limits import Abort, TemplateLimits, run_limited
from tandem.weights.chat_sandbox import TemplateRaised, compile_template

__all__ = ["FALLBACK_CHAT_TEMPLATE", "TemplateLimits", "chat_template_of", "render_chat"]

# Each message as "<Role>: <content>" followed by a blank line, then
# "Assistant:" when a reply is wanted. Content given as a list of parts keeps
# its text parts only. (The blank line is an expression because trim_blocks
# would eat a newline written right after a block tag.)
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_MESSAGE_CHARS = 300  # longest error text kept from a template, so an error stays one readable line


def chat_template_of(metadata: Mapping[str, Any]) -> tuple[str, bool]:
    """The chat template a GGUF carries, and whether it is the fallback (the file has none)."""
    template = metadata.get("tokenizer.chat_template")
    if template is None or (isinstance(template, str) and not template.strip()):
        return FALLBACK_CHAT_TEMPLATE, True
    if not isinstance(template, str):
        raise GGUFError(
            f"GGUF metadata tokenizer.chat_template should be a string, not {type(template).__name__}"
        )
    return template, False


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = "",
    eos_token: str | None = "",
    limits: TemplateLimits | None = None,
    **extra: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a chat template.

    `template` None means FALLBACK_CHAT_TEMPLATE. `extra` become template
    variables too (`tools`, `documents`, `enable_thinking`, other special
    tokens...); `tools` and `documents` default to None as in transformers.
    Message keys whose value is None are dropped, as transformers does,
    because templates test for a key's presence. `limits` overrides the
    sandbox's limits (it cannot be a template variable).

    Raises TemplateError on bad syntax, on raise_exception() in the template,
    on anything the sandbox refuses, and when a limit is hit.
    """
    source = FALLBACK_CHAT_TEMPLATE if template is None else template
    if not isinstance(source, str):
        raise TemplateError(f"a chat template must be a string, not {type(source).__name__}")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise TemplateError("chat messages must be a list of dicts")
    try:
        variables = {
            "tools": None,
            "documents": None,
            **_plain(extra),
            "messages": [{k: v for k, v in _plain(m).items() if v is not None} for m in messages],
            "add_generation_prompt": bool(add_generation_prompt),
            # A tokenizer without the token gives None; transformers then leaves the
            # variable out, which prints as nothing, not as "None".
            "bos_token": "" if bos_token is None else _plain(bos_token),
            "eos_token": "" if eos_token is None else _plain(eos_token),
        }
    except RecursionError:
        raise TemplateError("chat messages are nested too deeply") from None
    limits = limits or TemplateLimits()

    def render() -> str:
        pieces, length = [], 0
        for piece in compile_template(source).generate(**variables):
            length += len(piece)
            if length > limits.max_output_chars:
                raise Abort(f"the rendered chat is longer than {limits.max_output_chars} characters")
            pieces.append(piece)
        return "".join(pieces)

    try:
        return run_limited(limits, render)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"chat template syntax error on line {exc.lineno}: {_one_line(exc.message)}"
        ) from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"chat template refused by the sandbox: {_one_line(exc)}") from None
    except TemplateRaised as exc:
        raise TemplateError(f"chat template raised an error: {_one_line(exc)}") from None
    except Abort as exc:
        raise TemplateError(f"chat template stopped: {_one_line(exc)}") from None
    except Exception as exc:
        # The template is untrusted code: whatever it breaks (a TypeError, a
        # RecursionError, a MemoryError...) is a fault of the file, reported as such.
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from exc


def _plain(value: Any) -> Any:
    """A copy of `value` made of JSON-like types only, which are all the sandbox lets templates see.

    Rich objects carry methods the sandbox does not know to be unsafe.
    """
    kind = type(value)
    if value is None or kind in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars' kin) become the plain type.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    raise TemplateError(
        f"chat messages may hold only strings, numbers, booleans, lists and dicts, not {kind.__name__}"
    )


def _one_line(error: Any) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."
