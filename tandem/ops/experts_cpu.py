"""Routed experts on tandem's C++ CPU engine: one native call per layer, no Python per expert.

Same contract as tandem.ops.experts.QuantExperts (the torch reference it extends):
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, so a
rule swaps the experts module alone and the router and shared experts stay.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.cpu.engine import default_engine
from tandem.cpu.engine import enabled as engine_enabled
from tandem.errors import RuleError
from tandem.ops.experts import QuantExperts
from tandem.weights.source import GGUFWeights

# The engine's fused op computes down(silu(gate) * up).
SILU_NAMES = ("silu", "swish")


class ExpertsCPU(QuantExperts):
    """QuantExperts computed by the engine.

    generate_op: "engine" (default) or "torch" (the reference). With "engine", experts
    whose weight types have no engine kernel, or whose activation is not SiLU, take
    the torch path; `backend` says which one a layer got.
    """

    OPS = (None, "engine", "torch")

    def __init__(self, key: str, orig: nn.Module, config: PretrainedConfig, **kwargs):
        super().__init__(key, orig, config, **kwargs)
        if self.generate_device.type != "cpu":
            raise RuleError(
                f"{key}: ExpertsCPU runs on the CPU, not {self.generate_device}; use QuantExperts"
            )
        silu = getattr(config, "hidden_act", None) in SILU_NAMES
        use_engine = self.generate_op != "torch" and engine_enabled() and silu and self.dtype == torch.float32
        self.backend = "engine" if use_engine else "torch"
        self.engine_experts = None

    def load(self, weights: GGUFWeights) -> None:
        super().load(weights)
        if self.backend == "engine":
            engine = default_engine()
            if all(engine.supports(t.ggml_type) for t in (self.gate, self.up, self.down)):
                self.engine_experts = engine.experts(self.gate, self.up, self.down)
            else:
                self.backend = "torch"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # [T, H], [T, k], [T, k] -> [T, H]
        if self.engine_experts is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        out = self.engine_experts(hidden_states, top_k_index, top_k_weights)
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"
