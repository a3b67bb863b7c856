"""Kernel variants this machine can test: built into the extension and runnable on its CPU."""

from __future__ import annotations

from tandem.cpu.features import runnable_variants
from tandem.cpu.kernels import variants_built


def testable_variants() -> list[str]:
    runnable = set(runnable_variants())
    return [v for v in variants_built() if v in runnable]
