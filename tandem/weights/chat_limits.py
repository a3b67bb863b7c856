"""Time and size limits for rendering untrusted chat templates.

- Time: `run_limited` installs a `sys.settrace` hook that checks a deadline on
  every line of Python run while the template renders, including nested loops
  that print nothing. Breaking out raises `Abort`, a BaseException, so that no
  `except Exception` inside jinja or a filter can swallow it. The caller's own
  trace function (a debugger, coverage) is put back afterwards.
- Size: `measure` estimates how long a value would be as text, counting shared
  references as often as they would be printed, so a list of a list of ...
  the same big string is caught while it is built; it also bounds nesting,
  which Python's C code (repr, ==, hash) walks recursively. The check_*
  helpers refuse operations that would build an over-limit value in one
  C-level step (padding, replacing, joining, formatting), before they run.
  `chat_sandbox` calls them from the places where templates build values.
"""

import re
import sys
import time
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2.utils import Namespace


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may spend. The defaults leave real templates far from every limit."""

    time_s: float = 2.0
    max_output_chars: int = 16 << 20
    max_value_size: int = 16 << 20  # the text length of any one value the template builds
    max_depth: int = 100  # nesting of lists and dicts, which Python's C code walks recursively
    max_int_bits: int = 4096


class Abort(BaseException):
    """A template hit a limit. BaseException, so that nothing in jinja catches it on the way out."""


@dataclass
class _Render:
    limits: TemplateLimits
    # id -> (the value, kept alive so that its id stays unique; size; depth)
    sizes: dict[int, tuple[Any, int, int]]


_active: ContextVar[_Render] = ContextVar("tandem_chat_render")


def run_limited(limits: TemplateLimits, work: Callable[[], Any]) -> Any:
    """Run `work` under the time limit, with size checks enabled; Abort when a limit is hit."""
    deadline = time.monotonic() + limits.time_s

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise Abort(f"rendering took longer than {limits.time_s:g} s")
        return tracer

    token = _active.set(_Render(limits, {}))
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return work()
    finally:
        # A trace function that raised has already been removed by Python;
        # either way the caller's tracer (a debugger, coverage) comes back.
        sys.settrace(previous)
        _active.reset(token)


def _state() -> _Render:
    state = _active.get(None)
    if state is None:
        raise Abort("chat templates only run inside run_limited()")
    return state


def current_limits() -> TemplateLimits:
    return _state().limits


def measure(value: Any) -> int:
    """How long `value` would be as text (roughly), raising Abort past the limits."""
    return _measure(value, _state(), 0, set())[0]


def _measure(value: Any, state: _Render, depth: int, open_ids: set[int]) -> tuple[int, int, bool]:
    """(size, nesting depth, whether it can still change) of `value`.

    Lists, tuples and dicts cannot change in the immutable sandbox, so their
    sizes are remembered for the render; a namespace can, and so can anything
    holding one, so those are walked again each time.
    """
    kind = type(value)
    if kind is str or kind is bytes:
        return len(value) + 2, 0, False
    if kind is int:
        return value.bit_length() // 3 + 2, 0, False
    is_namespace = isinstance(value, Namespace)
    if not (is_namespace or isinstance(value, (list, tuple, dict, KeysView, ValuesView, ItemsView))):
        return (len(value) + 2 if isinstance(value, (str, bytes)) else 24), 0, False
    key = id(value)
    known = state.sizes.get(key)
    if known is not None:
        return known[1], known[2], False
    if key in open_ids:
        return 8, 0, True  # a namespace holding itself: repr() prints it as "..."
    limits = state.limits
    if depth >= limits.max_depth:
        raise Abort(f"a value is nested more than {limits.max_depth} levels deep")
    if is_namespace:
        value = object.__getattribute__(value, "_Namespace__attrs")
    items = value.items() if isinstance(value, dict) else value
    open_ids.add(key)
    size, inner, volatile = 2, 0, is_namespace
    for item in items:
        item_size, item_depth, item_volatile = _measure(item, state, depth + 1, open_ids)
        size += item_size + 2
        inner = max(inner, item_depth + 1)
        volatile = volatile or item_volatile
        if size > limits.max_value_size:
            raise Abort(f"a value would be longer than {limits.max_value_size} characters")
    open_ids.discard(key)
    if inner > limits.max_depth:
        raise Abort(f"a value is nested more than {limits.max_depth} levels deep")
    if not volatile:
        state.sizes[key] = (value, size, inner)
    return size, inner, volatile


def check_size(size: int, what: str = "a value") -> None:
    limit = _state().limits.max_value_size
    if size > limit:
        raise Abort(f"{what} would be longer than {limit} characters")


def check_count(count: Any, what: str) -> None:
    if type(count) is int:
        check_size(count, what)


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_FIELD = re.compile(r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


def check_format(template: str, args: Any, percent: bool) -> None:
    """Refuse a printf or str.format template whose widths or arguments would make a huge string."""
    fields = (
        [w + "." + p for w, p in _PERCENT_FIELD.findall(template)]
        if percent
        else _BRACE_FIELD.findall(template)
    )
    for number in re.findall(r"\d+", " ".join(fields)):
        check_count(int(number), "a formatted field")
    # A width can also come from the arguments: `%*s` or `{:{}}`.
    widths_from_args = any(("*" in f) if percent else f.count("{") > 1 for f in fields)
    total = len(template)
    for arg in args:
        if widths_from_args:
            check_count(arg, "a formatted field")
        total += measure(arg)
    check_size(total, "a formatted string")


def format_args(args: Any) -> list[Any]:
    if isinstance(args, tuple):
        return list(args)
    if isinstance(args, dict):
        return list(args.values())
    return [args]


def check_str_method(owner: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
    """Check a call of a str/bytes method that can grow the string; returns the (possibly materialized) args."""
    if name in ("center", "ljust", "rjust", "zfill"):
        check_count(args[0] if args else kwargs.get("width"), f"str.{name}()")
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if type(tabsize) is int:
            check_size(
                len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * tabsize, "expandtabs()"
            )
    elif (
        name == "replace" and len(args) >= 2 and type(args[0]) is type(owner) and type(args[1]) is type(owner)
    ):
        old, new = args[0], args[1]
        hits = owner.count(old) if old else len(owner) + 1
        if len(args) > 2 and type(args[2]) is int and args[2] >= 0:
            hits = min(hits, args[2])
        check_size(len(owner) + hits * max(0, len(new) - len(old)), "replace()")
    elif name == "join" and args:
        items = list(args[0])  # a generator would be spent by counting it, so pass the list on
        check_size(sum(measure(item) for item in items) + len(owner) * len(items), "join()")
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        widest = max((measure(v) for v in args[0].values()), default=1)
        check_size(len(owner) * widest, "translate()")
    elif name in ("format", "format_map"):
        values = [*args, *kwargs.values()]
        if name == "format_map" and args and isinstance(args[0], dict):
            values = list(args[0].values())
        check_format(owner if isinstance(owner, str) else "", values, percent=False)
    return args


def checked_value(value: Any) -> Any:
    """`value`, once measured: raises Abort if it is over the limits."""
    measure(value)
    return value
