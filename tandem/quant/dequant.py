"""Reference dequantization of GGUF tensors in plain torch.

Bit-exact with `gguf.quants.dequantize` (the numpy reference) for every type in
SUPPORTED_TYPES. Whole models go through here at load time, so the work is
vectorized over blocks and done in chunks that write into one preallocated
output: temporaries stay a few MiB (cache-sized) however large the tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

from tandem.errors import UnsupportedError
from tandem.quant import dequant_kquants, dequant_simple
from tandem.quant.quant_tensor import QuantTensor, block_layout

# kernel(blocks uint8 [n, type_size], out float32 [n, block_size]) -> None
Kernel = Callable[[torch.Tensor, torch.Tensor], None]

_KERNELS: dict[GGMLQuantizationType, Kernel] = {**dequant_simple.KERNELS, **dequant_kquants.KERNELS}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)

# Output values per chunk: 4 MiB of float32 plus a few MiB of uint8 codes.
# Measured on an idle 2-core machine, 1 Mi values is as fast as 4 Mi and twice
# as fast as 64 Ki (per-op overhead); a Q4_K 151936 x 1536 matrix takes ~0.4 s.
CHUNK_VALUES = 1 << 20


def dequantize(qt: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All values of `qt` as a new dense tensor of shape `qt.shape` and `dtype`."""
    kernel = _kernel(qt.ggml_type, f"tensor {qt.name!r} has type")
    block_size, type_size = block_layout(qt.ggml_type, qt.name)
    blocks = qt.data.reshape(-1, type_size)  # [n_blocks, type_size]
    out = torch.empty(qt.numel, dtype=_check_dtype(dtype))
    _run_chunked(kernel, blocks, out.view(-1, block_size))
    return out.view(qt.shape)


def dequantize_blocks(blocks: torch.Tensor, ggml_type: GGMLQuantizationType) -> torch.Tensor:
    """uint8 [n_blocks, type_size] -> float32 [n_blocks, block_size]."""
    ggml_type = GGMLQuantizationType(ggml_type)
    kernel = _kernel(ggml_type, "type")
    block_size, type_size = block_layout(ggml_type)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != type_size:
        raise ValueError(
            f"{ggml_type.name} blocks must be uint8 [n_blocks, {type_size}], "
            f"got {blocks.dtype} {list(blocks.shape)}"
        )
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    _run_chunked(kernel, blocks, out)
    return out


def _kernel(ggml_type: GGMLQuantizationType, subject: str) -> Kernel:
    kernel = _KERNELS.get(ggml_type)
    if kernel is None:
        supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
        raise UnsupportedError(
            f"{subject} {ggml_type.name}, which tandem cannot dequantize (supported: {supported})"
        )
    return kernel


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"dequantize needs a floating-point output dtype, got {dtype}")
    return dtype


def _run_chunked(kernel: Kernel, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """Run `kernel` over `blocks` [n, type_size] into `out` [n, block_size], chunk by chunk.

    Chunks run over blocks, not rows, so one huge row is bounded as well.
    Kernels get contiguous chunks (a no-op for the usual contiguous input).
    Outputs other than float32 go through one reused float32 buffer, because
    the kernels must compute in float32 to match the reference.
    """
    n_blocks, block_size = out.shape
    step = max(1, CHUNK_VALUES // block_size)
    scratch = None
    if out.dtype != torch.float32:
        scratch = torch.empty(min(step, n_blocks), block_size, dtype=torch.float32)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        chunk = blocks[start:stop].contiguous()
        if scratch is None:
            kernel(chunk, out[start:stop])
        else:
            buf = scratch[: stop - start]
            kernel(chunk, buf)
            out[start:stop].copy_(buf)
