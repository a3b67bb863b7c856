"""Torch references for the C++ kernels: what each one must compute.

A kernel dots GGUF weight rows with activation rows. For quantized weights the
activations are first quantized to 8-bit blocks (csrc/kernels/kernel_api.h
states the rule); `quantize_activations` follows the same rule in float32, so
its blocks equal the C++ ones bit for bit, and `dot_rows` is then the exact
product of the two dequantized operands, in float64. A kernel differs from it
only by float32 rounding in its sums.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from tandem.quant.dequant import dequantize_blocks
from tandem.quant.quant_tensor import block_layout

_FLOAT_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

# csrc/kernels/kernel_api.h ActFormat: float32 rows, blocks of 32, blocks of 256.
ACT_F32, ACT_Q8_32, ACT_Q8_256 = 0, 1, 2
ACT_BLOCK = {ACT_Q8_32: 32, ACT_Q8_256: 256}


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [n, k] -> (d float32 [n, k / block], q int8 [n, k]) with x ≈ d * q per block."""
    n, k = x.shape
    xb = x.float().reshape(n, k // block, block)  # [n, B, block]
    amax = xb.abs().amax(dim=-1)  # [n, B]
    d = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None])  # half to even, as the C++ conversion
    return d, q.to(torch.int8).reshape(n, k)


def prepared_activations(x: torch.Tensor, act_format: int) -> torch.Tensor:
    """The activations a kernel of `act_format` effectively multiplies by, float64 [n, k]."""
    if act_format == ACT_F32:
        return x.double()
    block = ACT_BLOCK[act_format]
    d, q = quantize_activations(x, block)
    n, k = q.shape
    return (d.double()[..., None] * q.double().reshape(n, k // block, block)).reshape(n, k)


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Values rounded to bfloat16 (nearest, ties to even), as float64: what the prefill kernels multiply."""
    return x.float().to(torch.bfloat16).double()


def gemm_rows(
    blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, x: torch.Tensor
) -> torch.Tensor:
    """The prefill kernels' product: bf16-rounded dequantized weights · bf16-rounded x, float64 [n, rows]."""
    if ggml_type in _FLOAT_DTYPES:
        w = blocks.reshape(-1).view(_FLOAT_DTYPES[ggml_type]).double().reshape(rows, -1)
    else:
        _, type_size = block_layout(ggml_type)
        w = dequantize_blocks(blocks.reshape(-1, type_size), ggml_type).double().reshape(rows, -1)
    return to_bf16(x) @ to_bf16(w).T


def dot_rows(
    blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, x: torch.Tensor, act_format: int
) -> torch.Tensor:
    """uint8 blocks [rows, row_bytes] · x float32 [n, k] -> float64 [n, rows], as the kernel defines it."""
    _, type_size = block_layout(ggml_type)
    w = dequantize_blocks(blocks.reshape(-1, type_size), ggml_type).double().reshape(rows, -1)  # [rows, k]
    return prepared_activations(x, act_format) @ w.T
