"""Environment variables that choose between named behaviours, read strictly: a value
outside the accepted ones is a one-line error naming them, never a silent default."""

from __future__ import annotations

import os

from tandem.errors import TandemError

ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")


def switch(name: str, default: bool) -> bool:
    """$name as on/off (1/0, on/off, true/false, yes/no; unset or empty: `default`)."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ON:
        return True
    if raw in OFF:
        return False
    raise TandemError(f"{name} must be 1 or 0 (on/off, true/false, yes/no), got {os.environ[name]!r}")


def choice(name: str, options: tuple[str, ...], default: str) -> str:
    """$name as one of `options` (unset or empty: `default`)."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in options:
        raise TandemError(f"{name} must be one of {', '.join(options)}, got {os.environ[name]!r}")
    return raw
