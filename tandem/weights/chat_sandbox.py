"""The jinja2 environment that chat templates run in.

A chat template comes from whoever made the GGUF file, so it is untrusted
code. The environment is configured as transformers configures its own
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop controls,
`tojson` without HTML escaping, `raise_exception`, `strftime_now`, a
`namespace` and `dict` that refuse Python internals), so real templates render
exactly as they do there. On top of that, every place where a template can
build a value in one step reports to `chat_limits`: the `*`, `**`, `+` and
`%` operators, `~` concatenation, list/tuple/dict literals, string methods,
filters, and every printed value. Render only inside `chat_limits.run_limited`.
"""

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from tandem.weights.chat_limits import (
    Abort,
    check_count,
    check_format,
    check_size,
    check_str_method,
    checked_value,
    current_limits,
    format_args,
    measure,
)


class TemplateRaised(Exception):
    """The template called raise_exception(message)."""


class _CheckingCodeGenerator(CodeGenerator):
    """Routes `~` and container literals through the environment, which checks their size.

    The stock sandbox can intercept arithmetic operators only; these are the
    other expressions that build values in one step.
    """

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.checked_concat((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")

    def _checked(self, visit: Callable[[Any, Any], None], node: Any, frame: Any) -> None:
        self.write("environment.checked_value(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Any) -> None:
        self._checked(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Any) -> None:
        self._checked(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Any) -> None:
        if node.ctx != "load":  # an assignment target such as `for a, b in ...`
            super().visit_Tuple(node, frame)
        else:
            self._checked(super().visit_Tuple, node, frame)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark
    assistant text for training masks; here it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _TemplateNamespace(Namespace):
    """namespace() that refuses underscore names, which could shadow Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _TemplateDict:
    """dict() for templates: plain dicts only, size-checked, no access to the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return checked_value(dict(*args, **kwargs))

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return checked_value(dict.fromkeys(*args, **kwargs))


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: plain json.dumps, without jinja's HTML escaping.
    step = indent if type(indent) is int else len(indent) if isinstance(indent, str) else 0
    check_size(measure(value) * (2 + max(step, 0)), "tojson()")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _guard_filter(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """Measure a filter's arguments, and refuse the calls of growing filters whose result would be too big."""

    @wraps(original)  # keeps jinja's pass_context / pass_eval_context marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for arg in (*args, *kwargs.values()):
            measure(arg)
        # The filter's own arguments, without the context jinja passes to some filters first.
        values = [
            arg
            for arg in args
            if not isinstance(arg, (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment))
        ]
        if name == "center":
            check_count(values[1] if len(values) > 1 else kwargs.get("width"), "center()")
        elif name in ("batch", "slice") and values:
            count = values[1] if len(values) > 1 else kwargs.get("linecount", kwargs.get("slices"))
            check_count(count, f"{name}()")
            fill = values[2] if len(values) > 2 else kwargs.get("fill_with")
            if fill is not None and type(count) is int:
                check_size(measure(fill) * count, f"{name}()")
        elif name == "indent" and values:
            width = values[1] if len(values) > 1 else kwargs.get("width", 4)
            step = len(width) if isinstance(width, str) else width if type(width) is int else 0
            check_size(measure(values[0]) * (1 + max(step, 0)), "indent()")
        elif name == "replace" and len(values) >= 3 and isinstance(values[0], str):
            check_str_method(values[0], "replace", tuple(values[1:]), {})
        elif name == "join" and values:
            items = list(values[0])
            sep = values[1] if len(values) > 1 else kwargs.get("d", "")
            check_size(sum(measure(item) for item in items) + measure(sep) * len(items), "join()")
            args = tuple(items if arg is values[0] else arg for arg in args)
        elif name == "format" and values and isinstance(values[0], str):
            check_format(values[0], [*values[1:], *kwargs.values()], percent=True)
        return original(*args, **kwargs)

    return guarded


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else measure(value)


class SandboxEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, plus the size checks described above."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CheckingCodeGenerator

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, loopcontrols],
            finalize=checked_value,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.globals["dict"] = _TemplateDict()
        self.globals["namespace"] = _TemplateNamespace

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja returns an undefined that fails only when used, so `{{ x.__class__ }}`
        # prints nothing; a template that reaches for Python internals is hostile,
        # so say so at once.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe"
        )

    def checked_value(self, value: Any) -> Any:
        return checked_value(value)

    def checked_concat(self, parts: tuple) -> str:
        check_size(sum(len(p) if type(p) is str else measure(p) for p in parts), "a ~ concatenation")
        return "".join(p if type(p) is str else str(p) for p in parts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limits = current_limits()
        if operator == "**" and type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
            if left.bit_length() * right > limits.max_int_bits:
                raise Abort(f"a power would have more than {limits.max_int_bits} bits")
        elif operator == "*":
            if type(left) is int and type(right) is int:
                if left.bit_length() + right.bit_length() > limits.max_int_bits:
                    raise Abort(f"a product would have more than {limits.max_int_bits} bits")
            elif type(right) is int and not isinstance(left, (int, float)):
                check_size(_length(left) * right, "a repetition")
            elif type(left) is int and not isinstance(right, (int, float)):
                check_size(_length(right) * left, "a repetition")
        elif operator == "+" and not isinstance(left, (int, float)):
            check_size(_length(left) + _length(right), "a sum")
        elif operator == "%" and isinstance(left, str):
            check_format(left, format_args(right), percent=True)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = check_str_method(owner, getattr(target, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


@lru_cache(maxsize=1)
def environment() -> SandboxEnvironment:
    return SandboxEnvironment()


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Parse and compile once per template text; call inside run_limited (jinja folds constants while compiling)."""
    return environment().from_string(source)
