"""The GPU linear kernels on one matrix: the Triton matvec on GGUF blocks against a bf16 copy.

python benchmarks/gpu_linear_bench.py [ROWS COLS] [TOKENS,...]
Random Q4_K, Q6_K and Q8_0 weights (default 4096 × 4096); for each token count, the median
time of `quant_triton.matvec` (blocks read in place), of torch's matmul with the weight
dequantized to bf16 once, and of `quant_triton.dequantize` itself, with the bytes per
second each reads (the blocks, or the bf16 copy). Needs a CUDA GPU.
"""

from __future__ import annotations

import statistics
import sys
from functools import partial

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from tandem.gpu import quant_triton
from tests.random_quant import random_blocks

TYPES = (T.Q4_K, T.Q6_K, T.Q8_0)


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    rows, cols = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (4096, 4096)
    tokens = [int(n) for n in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 4, 8]
    print(f"{torch.cuda.get_device_name(0)}, weight {rows} x {cols}; ms (GB/s)")
    for ggml_type in TYPES:
        block, _ = GGML_QUANT_SIZES[ggml_type]
        raw = random_blocks(ggml_type, rows * cols // block, seed=0, max_exponent=0).reshape(-1)
        blocks = torch.from_numpy(raw.copy()).cuda()
        dense = quant_triton.dequantize(blocks, ggml_type, rows, cols)
        ms = median_ms(partial(quant_triton.dequantize, blocks, ggml_type, rows, cols))
        line = [f"{ggml_type.name}: dequantize {ms:.3f} ({blocks.numel() / ms / 1e6:.0f})"]
        for n in tokens:
            x = torch.randn(n, cols, device="cuda")
            xb = x.bfloat16()
            mv = median_ms(partial(quant_triton.matvec, blocks, ggml_type, rows, x))
            mm = median_ms(partial(torch.nn.functional.linear, xb, dense))
            line.append(
                f"n={n}: matvec {mv:.3f} ({blocks.numel() / mv / 1e6:.0f}), bf16 {mm:.3f} ({dense.numel() * 2 / mm / 1e6:.0f})"
            )
        print("  ".join(line))


if __name__ == "__main__":
    main()
