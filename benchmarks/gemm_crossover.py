"""Where the prefill kernels overtake the 8-bit dot kernels: one linear layer, n tokens.

python benchmarks/gemm_crossover.py THREADS [ROWS COLS]
Random Q4_K and Q6_K weights (ROWS × COLS, default 2048 × 2048); for each token
count, the median time of the engine's linear op on the dot kernels and on the
prefill kernels this CPU selects, and their ratio. The engine's default
switch-over (TANDEM_CPU_GEMM_MIN_TOKENS) comes from runs of this script.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from tandem import _cpu
from tandem.cpu.engine import CPUEngine
from tests.random_quant import random_blocks


def median_seconds(op, x: torch.Tensor, out: torch.Tensor, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        op.forward(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    threads = int(sys.argv[1])
    rows, cols = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (2048, 2048)
    engine = CPUEngine(threads=threads)
    print(f"{engine}, weight {rows} x {cols}")
    if not engine.prefill:
        print("this CPU has no prefill kernels")
        return
    for ggml_type in (T.Q4_K, T.Q6_K):
        block, _ = GGML_QUANT_SIZES[ggml_type]
        w = torch.from_numpy(random_blocks(ggml_type, rows * cols // block, max_exponent=0).reshape(-1))
        dot = _cpu.LinearOp(engine.pool, engine.kernels, w.data_ptr(), int(ggml_type), rows, cols, "", 1)
        gemm = _cpu.LinearOp(
            engine.pool, engine.kernels, w.data_ptr(), int(ggml_type), rows, cols, engine.prefill, 1
        )
        print(f"{ggml_type.name}: tokens, dot ms, {engine.prefill} ms, dot/{engine.prefill}")
        for n in (4, 8, 16, 24, 32, 48, 64, 128, 256, 512):
            x = torch.randn(n, cols)
            out = torch.empty(n, rows)
            a, b = median_seconds(dot, x, out), median_seconds(gemm, x, out)
            print(f"  {n:4d} {a * 1e3:8.3f} {b * 1e3:8.3f} {a / b:6.2f}")


if __name__ == "__main__":
    main()
