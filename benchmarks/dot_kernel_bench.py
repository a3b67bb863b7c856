"""Weights per cycle of one dot kernel on one thread, weights in cache: is decode compute-bound?

python benchmarks/dot_kernel_bench.py [GHZ]
Times the engine's dot_rows for one token against 512 rows × 2048 columns of each
weight type (well inside L2), on the calling thread, and prints weights per second
and per cycle at GHZ (default 3.0). A kernel that reads fewer bytes per second than
one core's share of the machine's read bandwidth here cannot keep up at decode.
"""

from __future__ import annotations

import sys
import time

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.cpu.engine import CPUEngine, _native

ROWS, COLS = 512, 2048


def main() -> None:
    ghz = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    kernels = CPUEngine(threads=1).kernels
    x = torch.randn(1, COLS)
    out = torch.empty(1, ROWS)
    for t in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q8_0):
        block, size = GGML_QUANT_SIZES[t]
        w = torch.randint(0, 255, (ROWS * COLS // block * size,), dtype=torch.uint8)
        if t == GGMLQuantizationType.Q8_0:  # keep the f16 scales finite
            w.view(-1, size)[:, 1] = 0x3C
        args = (kernels, int(t), w.data_ptr(), ROWS, COLS, x.data_ptr(), 1, out.data_ptr())
        for _ in range(50):
            _native().dot_rows(*args)
        n, t0 = 400, time.perf_counter()
        for _ in range(n):
            _native().dot_rows(*args)
        seconds = (time.perf_counter() - t0) / n
        rate = ROWS * COLS / seconds
        print(
            f"{t.name}: {seconds * 1e6:7.1f} us per call, {rate / 1e9:5.2f} G weights/s, "
            f"{rate / (ghz * 1e9):4.2f} weights/cycle at {ghz} GHz, {w.numel() / seconds / 1e9:5.2f} GB/s"
        )


if __name__ == "__main__":
    main()
