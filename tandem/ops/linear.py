"""Quantized linear layer: weights kept as GGUF blocks, dequantized once at load or at every call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from tandem.errors import RuleError
from tandem.ops.base import TandemModule
from tandem.weights.source import GGUFWeights

DEQUANT_MODES = ("load", "call")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, key: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise RuleError(f"{key}: dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def take_linear(op: nn.Module, key: str, orig: nn.Module) -> None:
    """Checks that the replaced module is an nn.Linear and gives the operator its shape."""
    if not isinstance(orig, nn.Linear):
        raise RuleError(f"{key}: {type(op).__name__} replaces nn.Linear modules, not {type(orig).__name__}")
    op.in_features = orig.in_features
    op.out_features = orig.out_features
    op.has_bias = orig.bias is not None


def check_mode(key: str, dequant: str, modes: tuple[str, ...]) -> None:
    if dequant not in modes:
        raise RuleError(f"{key}: dequant must be one of {', '.join(modes)}, got {dequant!r}")


class QuantLinear(TandemModule):
    """y = x W^T + b with W from GGUF blocks.

    dequant="load": W is dequantized once into `dtype` (fast, memory = dense size).
    dequant="call": W stays as raw blocks (a view of the mmapped file) and is dequantized
    at every call (slow, memory = quantized size); a reference for kernels that read blocks.
    """

    def __init__(
        self,
        key: str,
        orig: nn.Module,
        config: PretrainedConfig,
        *,
        dequant: str = "load",
        dtype: str = "float32",
        **base,
    ):
        super().__init__(key, orig, config, **base)
        take_linear(self, key, orig)
        check_mode(key, dequant, DEQUANT_MODES)
        self.dequant = dequant
        self.dtype = parse_dtype(dtype, key)
        self.qweight = None
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None

    def load(self, weights: GGUFWeights) -> None:
        shape = (self.out_features, self.in_features)
        device = self.generate_device
        if self.dequant == "load":
            dense = weights.dense(f"{self.key}.weight", shape, self.dtype, device)
            self.weight = nn.Parameter(dense, requires_grad=False)
        else:
            self.qweight = weights.quant(f"{self.key}.weight", shape)
        if self.has_bias:
            bias = weights.dense(f"{self.key}.bias", (self.out_features,), self.dtype, device)
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        weight = self.weight
        if weight is None:
            weight = self.qweight.dequantize(self.dtype).to(self.generate_device)
        y = F.linear(x.to(device=self.generate_device, dtype=self.dtype), weight, self.bias)
        return y.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, in={self.in_features}, out={self.out_features}, dequant={self.dequant}"
        )
