"""The engine's user-facing error.

It lives here rather than in `tandem/errors.py` only because the engine was
written apart from that file; it derives from TandemError, so the CLI treats
it like every other input error.
"""

from tandem.errors import TandemError


class EngineError(TandemError):
    """A generation or evaluation request is invalid (sampling values, prompt, stops, token counts)."""
