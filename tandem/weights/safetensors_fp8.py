"""DeepSeek-V3's block-wise FP8 weights, dequantized on the CPU at load.

A weight W [O, I] is stored as float8_e4m3fn with `weight_scale_inv` [ceil(O/bo),
ceil(I/bi)] (float32), one scale per bo×bi block (128×128 in every DeepSeek-V3
checkpoint, named by config.json's `quantization_config.weight_block_size`):
W[o, i] = fp8[o, i] · scale_inv[o // bo, i // bi]. The product is taken in float32
and rounded once to the served dtype, as DeepSeek's fp8_cast_bf16 script does.

Memory: each dequantized matrix is new anonymous memory, 2 bytes per value in
BF16 (twice the FP8 file) or 4 in F32 (four times), plus one float32 matrix of
transient working space per weight being converted.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from tandem.errors import UnsupportedError, WeightError

SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"


def fp8_block_size(config: PretrainedConfig) -> tuple[int, int] | None:
    """The (rows, cols) block of an FP8 checkpoint's scales, or None for an unquantized one."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = qc.get("quant_method")
    if method != "fp8":
        raise UnsupportedError(
            f"quantization_config quant_method {method!r}: only block-wise 'fp8' is supported"
        )
    if qc.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedError(f"FP8 format {qc.get('fmt')!r}: only e4m3 is supported")
    block = qc.get("weight_block_size")
    if not (
        isinstance(block, list | tuple) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)
    ):
        raise WeightError(f"quantization_config weight_block_size {block!r} is not [rows, cols]")
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype, name: str = ""
) -> torch.Tensor:
    """fp8 [O, I] · per-block scale [ceil(O/bo), ceil(I/bi)] -> `dtype` [O, I]."""
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise WeightError(
            f"tensor {name!r}: FP8 weights must be 2-D float8_e4m3fn, not {weight.dtype} {list(weight.shape)}"
        )
    (o, i), (bo, bi) = weight.shape, block
    need = (-(-o // bo), -(-i // bi))
    if tuple(scale_inv.shape) != need:
        raise WeightError(
            f"tensor {name!r}: scale {list(scale_inv.shape)} does not fit weight [{o}, {i}] in {bo}x{bi} blocks "
            f"(needs {list(need)})"
        )
    scale = scale_inv.float().repeat_interleave(bo, 0)[:o].repeat_interleave(bi, 1)[:, :i]  # [O, I]
    return (weight.float() * scale).to(dtype)
