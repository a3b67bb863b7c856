"""Linear layers on the GPU from GGUF blocks, read by Triton kernels (tandem/gpu/quant_triton.py).

dequant="load" (the default): each weight is dequantized on the GPU once, at load, into
`dtype` (bf16: 2 bytes a weight) and multiplied by torch. dequant="none": the blocks stay
on the GPU as the file stores them (Q4_K: 0.56 bytes a weight); calls of up to
MATVEC_MAX_TOKENS tokens multiply them in the Triton matvec, which never writes the
dense matrix, and longer calls dequantize it for that call only. The placement plan
picks the mode per layer from the memory budget. Types without a Triton kernel (F16,
BF16, the legacy quants, Q2_K, Q3_K) are dequantized at load by the torch reference.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.errors import RuleError, TandemError
from tandem.ops.base import TandemModule
from tandem.ops.linear import check_mode, parse_dtype, take_linear
from tandem.quant.dequant import dequantize as reference_dequantize
from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.source import GGUFWeights

DEQUANT_MODES = ("load", "none")
DTYPES = ("bfloat16", "float32")
MATVEC_MAX_TOKENS = 8


def runs_here(device: torch.device) -> bool:
    """Triton compiles for CUDA devices; its interpreter (TRITON_INTERPRET=1) runs on the CPU."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def triton_kernels():
    """tandem.gpu.quant_triton, or a clear error where triton is missing."""
    try:
        from tandem.gpu import quant_triton
    except ImportError as error:
        raise TandemError(
            f"QuantLinearGPU needs the triton package (CUDA builds of torch ship it): {error}"
        ) from None
    return quant_triton


class _Part:
    """One GGUF tensor of the weight (a fused weight has several, stacked along the outputs)."""

    def __init__(self, qt: QuantTensor, device: torch.device, dequant: str, dtype: torch.dtype):
        quant_triton = triton_kernels()
        self.rows, self.cols = qt.shape
        self.ggml_type = qt.ggml_type
        self.blocks: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        if not quant_triton.supports(qt.ggml_type, self.cols):
            self.dense = reference_dequantize(qt, torch.float32).to(device=device, dtype=dtype)
            return
        blocks = qt.data.to(device)
        if dequant == "none":
            self.blocks = blocks
        else:
            self.dense = quant_triton.dequantize(blocks, qt.ggml_type, self.rows, self.cols, dtype)

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # x [n, cols] -> [n, rows]
        quant_triton = triton_kernels()
        if self.dense is not None:
            return nn.functional.linear(x.to(self.dense.dtype), self.dense).float()
        if x.shape[0] <= MATVEC_MAX_TOKENS:
            return quant_triton.matvec(self.blocks, self.ggml_type, self.rows, x.float())
        dense = quant_triton.dequantize(self.blocks, self.ggml_type, self.rows, self.cols, dtype)
        return nn.functional.linear(x.to(dtype), dense).float()


class QuantLinearGPU(TandemModule):
    """y = x W^T + b on the GPU, W from GGUF blocks; see the module's docstring for the modes."""

    def __init__(
        self,
        key: str,
        orig: nn.Module,
        config: PretrainedConfig,
        *,
        dequant: str = "load",
        dtype: str = "bfloat16",
        **base,
    ):
        super().__init__(key, orig, config, **base)
        take_linear(self, key, orig)
        if not runs_here(self.generate_device):
            raise RuleError(f"{key}: QuantLinearGPU runs on a CUDA device, not {self.generate_device}")
        check_mode(key, dequant, DEQUANT_MODES)
        if dtype not in DTYPES:
            raise RuleError(f"{key}: QuantLinearGPU computes in {' or '.join(DTYPES)}, not {dtype!r}")
        self.dequant = dequant
        self.dtype = parse_dtype(dtype, key)
        self.parts: list[_Part] = []
        self.bias: nn.Parameter | None = None
        self.shared = None  # a SharedInput computing this layer with its siblings
        self.shared_index = 0

    def load(self, weights: GGUFWeights) -> None:
        shape = (self.out_features, self.in_features)
        qts = weights.quant_parts(f"{self.key}.weight", shape)
        self.parts = [_Part(qt, self.generate_device, self.dequant, self.dtype) for qt in qts]
        if self.has_bias:
            bias = weights.dense(
                f"{self.key}.bias", (self.out_features,), torch.float32, self.generate_device
            )
            self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self.shared is not None:  # one product with its siblings (linear_gpu_fused.py)
            return self.shared.take(self.shared_index, x).to(device=x.device, dtype=x.dtype)
        flat = x.reshape(-1, self.in_features).to(self.generate_device)
        outs = [part(flat, self.dtype) for part in self.parts]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, in={self.in_features}, out={self.out_features}, "
            f"dequant={self.dequant}, dtype={str(self.dtype).removeprefix('torch.')}"
        )
