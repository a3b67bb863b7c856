"""Walk a model, apply the first matching rule to each module, record where everything goes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from tandem.errors import RuleError, TandemError
from tandem.inject.rules import Rule


@dataclass(frozen=True)
class Placement:
    """One module the rules touched: what it became and where it runs."""

    path: str
    original: str  # class name of the Hugging Face module
    operator: str | None  # dotted class of the tandem operator, None when kept ("default")
    device: str
    rule: str  # "file: rule N"


def inject(model: nn.Module, rules: list[Rule], config: PretrainedConfig, default_device: str = "cpu"):
    """Replace modules in place by the rules' operators.

    Returns (placements, devices): the modules rules matched, and for every module path
    the device its own (non-operator) parameters go to.
    """
    placements: list[Placement] = []
    devices: dict[str, str] = {"": default_device}

    def visit(parent: nn.Module, prefix: str, device: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            rule = next((r for r in rules if r.matches(path, child, device)), None)
            child_device = device
            if rule is not None:
                child_device = rule.kwargs.get("generate_device", device)
                original = type(child).__name__
                operator = None
                if rule.replace_class is not None:
                    child = _build(rule, path, child, config, child_device)
                    parent.add_module(name, child)
                    operator = f"{rule.replace_class.__module__}.{rule.replace_class.__name__}"
                placements.append(Placement(path, original, operator, child_device, rule.where))
            devices[path] = child_device
            if rule is None or rule.recursive:
                visit(child, path, child_device)
            else:
                _inherit(child, path, child_device, devices)

    visit(model, "", default_device)
    return placements, devices


def _build(rule: Rule, path: str, orig: nn.Module, config: PretrainedConfig, device: str) -> nn.Module:
    # An operator whose rule names no device runs where its parent does.
    kwargs = {"generate_device": device, **rule.kwargs}
    try:
        return rule.replace_class(path, orig, config, **kwargs)
    except TandemError as error:
        raise RuleError(f"{rule.where} on {path}: {error}") from None


def _inherit(module: nn.Module, prefix: str, device: str, devices: dict[str, str]) -> None:
    """A non-recursive rule places the whole subtree on its device."""
    for name, _ in module.named_modules(prefix=prefix):
        devices[name] = device
