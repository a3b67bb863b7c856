"""Weights per second of one dot kernel on one thread, weights in cache, for a range of token counts.

python benchmarks/dot_kernel_bench.py [GHZ] [TOKENS,...] [VARIANT [wide-ab]]
Times the engine's dot_rows (activation preparation included) against 512 rows × 2048
columns of Q4_K, Q5_K, Q6_K, Q5_0 and Q8_0 (well inside L2), on the calling thread, for each
token count (default 1,8,16,32,64), and prints multiply-adds per second and per cycle at
GHZ (default 3.0). At one token it shows whether decode can be compute-bound (a kernel
reading fewer bytes per second than one core's share of the read bandwidth cannot keep
up); at several, where the 16-row tiled kernels of AVX-512 VNNI take over from the
per-row ones (dot_tiled.inc: each type's kMinTokens). `wide-ab` instead times one token
with the 512-bit one-token loops and with the 256-bit ones (TANDEM_CPU_DECODE_WIDE) in
alternation, ten rounds in one process, so that a shared machine's drift falls on both alike.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.cpu.engine import CPUEngine, _native

ROWS, COLS = 512, 2048
TYPES = (
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q8_0,
)


def random_weights(t: GGMLQuantizationType) -> torch.Tensor:
    block, size = GGML_QUANT_SIZES[t]
    w = torch.randint(
        0, 255, (ROWS * COLS // block * size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    scale_byte = {GGMLQuantizationType.Q6_K: size - 1, GGMLQuantizationType.Q4_K: 1}.get(t, 1)
    w.view(-1, size)[:, scale_byte] = 0x3C  # keep the fp16 scales finite
    if t == GGMLQuantizationType.Q4_K:
        w.view(-1, size)[:, 3] = 0x3C
    return w


def seconds_per_call(args: tuple, n_tok: int) -> float:
    for _ in range(3):
        _native().dot_rows(*args)
    best = float("inf")
    for _ in range(7):
        reps = max(3, 200 // n_tok)
        t0 = time.perf_counter()
        for _ in range(reps):
            _native().dot_rows(*args)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    ghz = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    tokens = [int(n) for n in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 8, 16, 32, 64]
    variant = sys.argv[3] if len(sys.argv) > 3 else CPUEngine(threads=1).kernels
    print(f"variant {variant}, {ROWS} x {COLS}, one thread; G multiply-adds/s (per cycle at {ghz} GHz)")
    if len(sys.argv) > 4 and sys.argv[4] == "wide-ab":
        wide_ab(variant)
        return
    for t in TYPES:
        w = random_weights(t)
        cells = []
        for n in tokens:
            x, out = torch.randn(n, COLS), torch.empty(n, ROWS)
            seconds = seconds_per_call(
                (variant, int(t), w.data_ptr(), ROWS, COLS, x.data_ptr(), n, out.data_ptr()), n
            )
            rate = ROWS * COLS * n / seconds
            cells.append(f"{n}: {rate / 1e9:6.1f} ({rate / (ghz * 1e9):4.1f})")
        print(f"{t.name:5s} " + "  ".join(cells))


def wide_ab(variant: str) -> None:
    rates: dict[tuple[str, bool], list[float]] = {}
    x, out = torch.randn(1, COLS), torch.empty(1, ROWS)
    weights = {t: random_weights(t) for t in TYPES}
    for _ in range(10):
        for t in TYPES:
            for wide in (True, False):
                _native().set_decode_wide(wide)
                args = (variant, int(t), weights[t].data_ptr(), ROWS, COLS, x.data_ptr(), 1, out.data_ptr())
                rates.setdefault((t.name, wide), []).append(ROWS * COLS / seconds_per_call(args, 1) / 1e9)
    _native().set_decode_wide(True)
    for t in TYPES:
        a, b = rates[(t.name, True)], rates[(t.name, False)]
        ratios = sorted(x / y for x, y in zip(a, b, strict=True))
        print(
            f"{t.name:5s} 512-bit median {statistics.median(a):5.1f}, 256-bit {statistics.median(b):5.1f}; "
            f"ratio per round: median {statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
