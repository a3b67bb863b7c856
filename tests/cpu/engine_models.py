"""Helpers for tests that run one file both on the engine and on the torch path."""

from __future__ import annotations

from tandem.cpu import engine
from tandem.cpu.engine import CPUEngine
from tandem.inject.model import load_model


def load_both(path):
    """(on the engine, on torch): the same file loaded twice, the engine switched on, then off."""
    was = engine.enabled()
    try:
        engine.set_enabled(True)
        fast = load_model(path, progress=False)
        engine.set_enabled(False)
        ref = load_model(path, progress=False)
    finally:
        engine.set_enabled(was)
    return fast, ref


def count_calls(monkeypatch, method: str) -> list:
    """Records the first argument's shape of every CPUEngine.<method> call from now on."""
    calls = []
    real = getattr(CPUEngine, method)

    def counting(self, first, *args, **kwargs):
        calls.append(first.shape)
        return real(self, first, *args, **kwargs)

    monkeypatch.setattr(CPUEngine, method, counting)
    return calls


def without_bf16_prefill(monkeypatch) -> None:
    """The process's engine without the bf16 prefill kernels and prompt attention (AMX's by
    default where it runs): F16 weights then take the float dot kernels, and a prompt's
    logits differ from torch's by float rounding alone, whatever the machine."""
    monkeypatch.setattr(engine, "_default", CPUEngine(prefill="off", attention_bf16=False))
