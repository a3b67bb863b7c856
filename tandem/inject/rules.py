"""YAML rule files in the KTransformers schema: which module becomes which operator, on which device.

A rule file is a list of rules; each rule is

    - match:
        name: "^model\\.layers\\..*\\.mlp\\.down_proj$"   # regex searched in the module path
        class: torch.nn.Linear                             # and/or: the module is an instance of it
        device: cpu                                        # and/or: it would run there (tandem's addition)
      replace:
        class: tandem.ops.linear.QuantLinear               # or "default": keep the module
        kwargs: {generate_device: cpu, dequant: load}
      recursive: true                                      # false: don't descend into its children

For every module, walking from the root, the first rule that matches wins.
`match.device` compares with the device the module would run on if the rule named
none (its parent's, or `--device` at the root): "cpu" matches any CPU, "cuda" any
GPU, "cuda:1" only that one. It lets one rule file pick the CPU engine's operators
on the CPU and others elsewhere.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tandem.errors import RuleError

RULE_KEYS = {"match", "replace", "recursive"}
MATCH_KEYS = {"name", "class", "device"}
REPLACE_KEYS = {"class", "kwargs", "device"}
DEFAULT = "default"


@dataclass(frozen=True)
class Rule:
    index: int  # position in the file, for messages
    source: str  # file name, for messages
    name: re.Pattern[str] | None
    match_class: type | None
    replace_class: type | None  # None: "default" (keep the module) or no replace section
    kwargs: dict[str, Any] = field(default_factory=dict)
    recursive: bool = True
    match_device: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}: rule {self.index + 1}"

    def matches(self, path: str, module: Any, device: str = "cpu") -> bool:
        if self.name is not None and self.name.search(path) is None:
            return False
        if self.match_device is not None and not _same_device(device, self.match_device):
            return False
        return self.match_class is None or isinstance(module, self.match_class)


def _same_device(device: str, pattern: str) -> bool:
    """'cuda' matches every GPU; 'cuda:1' only that one."""
    if ":" in pattern:
        return torch.device(device) == torch.device(pattern)
    return torch.device(device).type == torch.device(pattern).type


def load_rules(path: str | Path) -> list[Rule]:
    """Parse and validate a rule file; every problem is a RuleError naming the rule."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RuleError(f"cannot read rule file {path}: {error}") from None
    return parse_rules(text, path.name)


def parse_rules(text: str, source: str = "<rules>") -> list[Rule]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise RuleError(f"{source}: not valid YAML: {detail}") from None
    if not isinstance(data, list) or not data:
        raise RuleError(f"{source}: a rule file is a non-empty YAML list of rules")
    return [_parse_rule(item, i, source) for i, item in enumerate(data)]


def _parse_rule(item: Any, index: int, source: str) -> Rule:
    where = f"{source}: rule {index + 1}"
    if not isinstance(item, dict):
        raise RuleError(f"{where}: a rule is a mapping with 'match' and 'replace'")
    _check_keys(item, RULE_KEYS, where)
    match = item.get("match")
    if not isinstance(match, dict) or not match:
        raise RuleError(f"{where}: 'match' must be a mapping with 'name', 'class' and/or 'device'")
    _check_keys(match, MATCH_KEYS, f"{where} match")
    name = None
    if "name" in match:
        if not isinstance(match["name"], str):
            raise RuleError(f"{where}: match.name must be a string (a regular expression)")
        try:
            name = re.compile(match["name"])
        except re.error as error:
            raise RuleError(f"{where}: match.name {match['name']!r} is not a valid regex: {error}") from None
    match_class = _import_class(match["class"], f"{where} match.class") if "class" in match else None
    match_device = _check_device(match["device"], f"{where} match.device") if "device" in match else None

    replace = item.get("replace", {})
    if not isinstance(replace, dict):
        raise RuleError(f"{where}: 'replace' must be a mapping")
    _check_keys(replace, REPLACE_KEYS, f"{where} replace")
    kwargs = replace.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise RuleError(f"{where}: replace.kwargs must be a mapping of names to values")
    kwargs = dict(kwargs)
    if "device" in replace:  # shorthand used by some rule files
        kwargs.setdefault("generate_device", replace["device"])
    for key in ("generate_device", "prefill_device"):
        if key in kwargs:
            kwargs[key] = _check_device(kwargs[key], f"{where} replace.kwargs.{key}")
    replace_class = None
    target = replace.get("class", DEFAULT)
    if target != DEFAULT:
        replace_class = _import_class(target, f"{where} replace.class")
        _check_operator(replace_class, kwargs, where)
    recursive = item.get("recursive", True)
    if not isinstance(recursive, bool):
        raise RuleError(f"{where}: 'recursive' must be true or false")
    return Rule(index, source, name, match_class, replace_class, kwargs, recursive, match_device)


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise RuleError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )


def _import_class(dotted: Any, where: str) -> type:
    if not isinstance(dotted, str) or "." not in dotted:
        raise RuleError(f"{where}: {dotted!r} is not a dotted class path like tandem.ops.linear.QuantLinear")
    module_name, _, class_name = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RuleError(f"{where}: cannot import module {module_name!r} ({error})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise RuleError(f"{where}: {module_name!r} has no class {class_name!r}")
    return cls


def _check_device(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RuleError(f"{where}: a device is a string like 'cpu' or 'cuda:0'")
    try:
        torch.device(value)
    except RuntimeError:
        raise RuleError(f"{where}: {value!r} is not a device") from None
    return value


def _check_operator(cls: type, kwargs: dict[str, Any], where: str) -> None:
    from tandem.ops.base import TandemModule

    if not issubclass(cls, TandemModule):
        raise RuleError(f"{where}: {cls.__module__}.{cls.__name__} is not a tandem operator (a TandemModule)")
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise RuleError(
            f"{where}: {cls.__name__} takes no argument(s) {', '.join(unknown)} (it takes {', '.join(sorted(accepted))})"
        )


def _accepted_kwargs(cls: type) -> set[str]:
    """Keyword-only arguments of the operator's __init__ and of its bases (passed on via **base)."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        accepted |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return accepted
