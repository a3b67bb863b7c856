"""Single kernel calls, for tests and micro-benchmarks of the C++ kernels.

The ops (tandem/cpu/engine.py) call kernels through the thread pool; these
functions call one kernel on the calling thread, with the same checks the ops
make, so a kernel can be held against tandem/cpu/reference.py in isolation.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from tandem.cpu.features import _native
from tandem.errors import UnsupportedError
from tandem.quant.quant_tensor import block_layout


def variants_built() -> list[str]:
    """Kernel variants compiled into the extension ('generic', 'avx2', 'avx512')."""
    return list(_native().variants_built())


def kernel_types(variant: str) -> list[GGMLQuantizationType]:
    """Weight types the variant has kernels for."""
    return [GGMLQuantizationType(t) for t in _native().kernel_types(variant)]


def act_format(variant: str, ggml_type: GGMLQuantizationType) -> int:
    """How the type's kernel takes activations (tandem.cpu.reference ACT_*)."""
    return int(_native().act_format(variant, int(ggml_type)))


def _check_blocks(blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, x: torch.Tensor):
    """(n, k) of x after checking that blocks hold `rows` rows of k values of the type."""
    block_size, type_size = block_layout(ggml_type)
    n, k = x.shape
    if k % block_size:
        raise UnsupportedError(f"{k} columns is not a multiple of {ggml_type.name}'s block of {block_size}")
    if (
        blocks.dtype != torch.uint8
        or not blocks.is_contiguous()
        or blocks.numel() != rows * k // block_size * type_size
    ):
        raise ValueError(f"expected {rows} rows of {k} {ggml_type.name} values as contiguous uint8")
    return n, k


def dot_rows(
    variant: str, blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, x: torch.Tensor
) -> torch.Tensor:
    """uint8 blocks (rows × row_bytes) · x float32 [n, k] -> float32 [n, rows], one kernel call."""
    n, k = _check_blocks(blocks, ggml_type, rows, x)
    x = x.float().contiguous()
    out = torch.empty(n, rows, dtype=torch.float32)
    _native().dot_rows(variant, int(ggml_type), blocks.data_ptr(), rows, k, x.data_ptr(), n, out.data_ptr())
    return out


def quantize_activations(
    variant: str, x: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [n, k] -> (d [n, B], q int8 [n, k], sums int32 [n, B * sums per block]) as the C++ blocks hold them.

    Blocks of 32 carry one sum each, blocks of 256 one per 16 values.
    """
    n, k = x.shape
    x = x.float().contiguous()
    if block == 32:
        fmt, size = 1, 40
    else:
        fmt, size = 2, 292
    raw = torch.zeros(n, k // block, size, dtype=torch.uint8)
    _native().quantize_activations(variant, fmt, x.data_ptr(), n, k, raw.data_ptr())
    d = raw[..., 0:4].contiguous().view(torch.float32).reshape(n, -1)
    if block == 32:
        sums = raw[..., 4:8].contiguous().view(torch.int32).reshape(n, -1)
        q = raw[..., 8:40].contiguous().view(torch.int8).reshape(n, k)
    else:
        sums = raw[..., 4:36].contiguous().view(torch.int16).reshape(n, -1).int()
        q = raw[..., 36:292].contiguous().view(torch.int8).reshape(n, k)
    return d, q, sums


def prefill_kernels_built() -> list[str]:
    """Prefill (bf16 tile) kernel sets compiled into the extension ('avx512bf16', 'amx')."""
    return list(_native().gemm_built())


def gemm_rows(
    name: str, blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, x: torch.Tensor
) -> torch.Tensor:
    """uint8 blocks (rows × row_bytes) · x float32 [n, k] -> float32 [n, rows] through the prefill kernels."""
    n, k = _check_blocks(blocks, ggml_type, rows, x)
    x = x.float().contiguous()
    out = torch.empty(n, rows, dtype=torch.float32)
    _native().gemm_matmul(name, int(ggml_type), blocks.data_ptr(), rows, k, x.data_ptr(), n, out.data_ptr())
    return out
