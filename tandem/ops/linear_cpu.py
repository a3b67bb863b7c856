"""Linear layers on tandem's C++ CPU engine: weights stay GGUF blocks, activations go 8-bit.

The engine reads each weight row once per call for all tokens (decode streams the
file's blocks, no dequantized copy in RAM). A weight type the engine has no kernel
for falls back to QuantLinear's dequantize-at-load path, so any GGUF loads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.cpu.engine import default_engine
from tandem.cpu.engine import enabled as engine_enabled
from tandem.errors import RuleError
from tandem.ops.base import TandemModule
from tandem.ops.linear import take_linear
from tandem.weights.source import GGUFWeights

OPS = (None, "engine", "torch")


class QuantLinearCPU(TandemModule):
    """y = x W^T + b on the CPU engine.

    generate_op: "engine" (default) or "torch" (dequantize to float32 at load and use
    torch, the reference). With "engine", a tensor whose type has no engine kernel
    takes the torch path too; `backend` says which one a layer got.
    """

    def __init__(self, key: str, orig: nn.Module, config: PretrainedConfig, **base):
        super().__init__(key, orig, config, **base)
        take_linear(self, key, orig)
        if self.generate_device.type != "cpu":
            raise RuleError(
                f"{key}: QuantLinearCPU runs on the CPU, not {self.generate_device}; use QuantLinear"
            )
        if self.generate_op not in OPS or self.prefill_op not in OPS:
            raise RuleError(f"{key}: QuantLinearCPU's ops are 'engine' and 'torch'")
        self.backend = "engine" if self.generate_op != "torch" and engine_enabled() else "torch"
        self.parts: list = []  # engine linears, one per GGUF part of a fused weight
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None

    def load(self, weights: GGUFWeights) -> None:
        name = f"{self.key}.weight"
        shape = (self.out_features, self.in_features)
        if self.backend == "engine":
            engine = default_engine()
            parts = weights.quant_parts(name, shape)
            if all(engine.supports(p.ggml_type) for p in parts):
                self.parts = [engine.linear(p) for p in parts]
            else:
                self.backend = "torch"
        if self.backend == "torch":
            self.weight = nn.Parameter(weights.dense(name, shape, torch.float32, "cpu"), requires_grad=False)
        if self.has_bias:
            bias = weights.dense(f"{self.key}.bias", (self.out_features,), torch.float32, "cpu")
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.backend == "torch":
            y = nn.functional.linear(x.to(device="cpu", dtype=torch.float32), self.weight, self.bias)
        else:
            outs = [part(x) for part in self.parts]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.bias is not None:
                y += self.bias
        return y.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, in={self.in_features}, out={self.out_features}, backend={self.backend}"
        )
