"""A prompt's rotary position embedding on the engine, for models whose operators run there.

transformers' `apply_rotary_pos_emb` (rotate-half form) costs four elementwise torch ops
and their temporaries per tensor: on the 16-core Xeon, the mul, cat, add and neg of a
512-token prompt took 385 ms of a 1.9 s Qwen3-30B-A3B prefill. The engine does the same
arithmetic in one pass over q and k (csrc/engine/rope.cpp).

The function is looked up as a global of each family's modeling module, so it is replaced
there, once, by a wrapper; the wrapper takes the engine only inside the attention forward of
a model loaded onto the engine (`install`), and otherwise, or for tensors outside the
engine's form, calls the original.
"""

from __future__ import annotations

import contextvars
import functools
import importlib

import torch
from torch import nn

from tandem.cpu.engine import default_engine

# Families whose modeling module applies the rotate-half RoPE through apply_rotary_pos_emb(q, k, cos, sin).
FAMILIES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma3")
_ACTIVE = contextvars.ContextVar("tandem_engine_rope", default=False)


def _engine_rope(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if _ACTIVE.get() and unsqueeze_dim == 1 and len(args) + len(kwargs) <= 1:
            engine = default_engine()
            q_out = engine.rope_half(q, cos, sin)
            k_out = engine.rope_half(k, cos, sin) if q_out is not None else None
            if k_out is not None:
                return q_out, k_out
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._tandem_original = original
    return apply_rotary_pos_emb


def _patch(family: str) -> bool:
    try:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        return False
    current = getattr(module, "apply_rotary_pos_emb", None)
    if current is None:
        return False
    if not hasattr(current, "_tandem_original"):
        module.apply_rotary_pos_emb = _engine_rope(current)
    return True


def install(model: nn.Module) -> int:
    """Route the prompt RoPE of `model`'s attention modules to the engine; returns how many."""
    family = type(model).__module__.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    if family not in FAMILIES or not _patch(family):
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "q_proj"):
            _activate_during(module)
            count += 1
    return count


def _activate_during(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def engine_rope_forward(*args, **kwargs):
        token = _ACTIVE.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    module.forward = engine_rope_forward


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' arithmetic, for tests: x cos + rotate_half(x) sin with cos, sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
