"""RMSNorm, in the plain form (x̂·w) and Gemma's (x̂·(1+w)) form."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.cpu.engine import default_engine
from tandem.cpu.engine import enabled as engine_enabled
from tandem.errors import RuleError
from tandem.ops.base import TandemModule
from tandem.weights.source import GGUFWeights


class RMSNorm(TandemModule):
    """Root-mean-square norm computed in float32, then scaled.

    unit_offset: scale by (1 + w) as Gemma does; by default taken from the replaced
    module (Gemma's norms initialise w to zeros and add one in forward).
    """

    def __init__(
        self, key: str, orig: nn.Module, config: PretrainedConfig, *, unit_offset: bool | None = None, **base
    ):
        super().__init__(key, orig, config, **base)
        weight = getattr(orig, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise RuleError(
                f"{key}: RMSNorm replaces norm modules with a 1-D weight, not {type(orig).__name__}"
            )
        self.hidden_size = weight.shape[0]
        self.eps = float(getattr(orig, "variance_epsilon", getattr(orig, "eps", 1e-6)))
        self.unit_offset = (
            type(orig).__name__.startswith("Gemma") if unit_offset is None else bool(unit_offset)
        )
        self.weight: nn.Parameter | None = None
        self._engine = None

    def load(self, weights: GGUFWeights) -> None:
        w = weights.dense(f"{self.key}.weight", (self.hidden_size,), torch.float32, self.generate_device)
        self.weight = nn.Parameter(w, requires_grad=False)
        # The factor forward multiplies by, formed once (Gemma's 1 + w).
        self.register_buffer("scale", 1.0 + w if self.unit_offset else w, persistent=False)
        # On the CPU the engine's kernel does the whole norm in one call: a decode step
        # has four to six norms per layer, each half a dozen small torch ops otherwise.
        self._engine = default_engine() if self.generate_device.type == "cpu" and engine_enabled() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden]
        if self._engine is not None and x.dtype is torch.float32 and x.device.type == "cpu":
            # A strided view (Gemma's q_norm sees the heads transposed) is copied first: a copy
            # costs a tenth of torch's norm on one thread.
            return self._engine.rms_norm(x.contiguous(), self.scale, self.eps)
        # One torch call: x * rsqrt(mean(x²) + eps) * scale in float32.
        h = x.to(device=self.generate_device, dtype=torch.float32)
        h = torch.nn.functional.rms_norm(h, (self.hidden_size,), self.scale, self.eps)
        return h.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.hidden_size}, eps={self.eps}, unit_offset={self.unit_offset}"
