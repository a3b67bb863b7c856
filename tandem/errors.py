"""Errors meant for the user: each carries one clear line of text.

The CLI prints `str(error)` and exits non-zero; anything that is not a
TandemError is a bug in tandem.
"""


class TandemError(Exception):
    """Base of every error that is the user's input's fault, not tandem's."""


class GGUFError(TandemError):
    """A GGUF file is malformed, truncated or inconsistent."""


class UnsupportedError(TandemError):
    """A valid input that tandem does not support (architecture, tensor type...)."""


class RuleError(TandemError):
    """A YAML rule file is malformed or names something that does not exist."""


class WeightError(TandemError):
    """A tensor is missing from the weights or has the wrong shape."""


class TemplateError(TandemError):
    """A chat template failed to render (bad syntax, hostile, too slow or too large)."""
