"""One MoE layer's routed experts three ways, for the crossover of `prefill_on_gpu_from`.

python benchmarks/gpu_experts_bench.py [THREADS] [TOKENS,...]
A Qwen3-30B-A3B-shaped layer of random blocks (128 experts, top 8, hidden 2048, expert
width 768; gate and up Q4_K, down Q6_K), random routing. For each token count, the median
ms of:
- engine: the CPU engine's MoE op (THREADS threads), hidden states already on the CPU;
- gpu, copied: tandem.gpu.moe_batched with the blocks in page-locked CPU memory, copies
  included (what a hybrid layer's prompt pays);
- gpu, resident: the same with the blocks already on the GPU;
and, for 1 and 8 tokens, the routed matvec kernels (a decode step's experts on the GPU).
Needs a CUDA GPU.
"""

from __future__ import annotations

import tandem  # noqa: F401  (first: OMP_WAIT_POLICY for torch's threads)

# isort: split
import statistics
import sys
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from tandem.cpu.engine import configure
from tandem.gpu import quant_triton
from tandem.gpu.cudart import register_host_memory
from tandem.gpu.moe_batched import batched_experts
from tandem.quant.quant_tensor import QuantTensor
from tandem.synth.random_blocks import random_blocks

E, K, H, INTER = 128, 8, 2048, 768


def blocks(ggml_type: T, shape: tuple[int, int, int], seed: int) -> QuantTensor:
    from gguf import GGML_QUANT_SIZES

    block, _ = GGML_QUANT_SIZES[ggml_type]
    n_blocks = shape[0] * shape[1] * shape[2] // block
    raw = random_blocks(ggml_type, n_blocks, np.random.default_rng(seed)).reshape(-1)
    return QuantTensor(torch.from_numpy(raw.copy()), ggml_type, shape, f"t{seed}")


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    counts = [int(n) for n in sys.argv[2].split(",")] if len(sys.argv) > 2 else [32, 128, 512, 2048]
    engine = configure(threads=threads)
    gate, up = blocks(T.Q4_K, (E, INTER, H), 1), blocks(T.Q4_K, (E, INTER, H), 2)
    down = blocks(T.Q6_K, (E, H, INTER), 3)
    pinned = all(register_host_memory(qt.data) is not None for qt in (gate, up, down))
    on_gpu = [QuantTensor(qt.data.cuda(), qt.ggml_type, qt.shape, qt.name) for qt in (gate, up, down)]
    op = engine.experts(gate, up, down)
    mb = sum(qt.n_bytes for qt in (gate, up, down)) / 1e6
    print(
        f"{torch.cuda.get_device_name(0)}; {mb:.0f} MB of blocks a layer; page-locked: {pinned}; "
        f"engine {engine.threads} threads ({engine.kernels}); median ms"
    )
    silu = torch.nn.functional.silu
    for n in counts:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, H, generator=gen)
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)])
        w = torch.rand(n, K, generator=gen)
        xg, idg, wg = x.cuda(), ids.cuda(), w.cuda()
        cpu = median_ms(lambda: op(x, ids, w))  # noqa: B023
        copied = median_ms(lambda: batched_experts(xg, idg, wg, gate, up, down, silu))  # noqa: B023
        resident = median_ms(lambda: batched_experts(xg, idg, wg, *on_gpu, silu))  # noqa: B023
        print(
            f"  {n:5d} tokens: engine {cpu:8.2f}   gpu, copied {copied:8.2f}   gpu, resident {resident:8.2f}"
        )
    for n in (1, 8):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, H, generator=gen).cuda()
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)]).reshape(-1).cuda()
        g, u, d = on_gpu

        def routed():
            h = silu(quant_triton.routed_matvec(g.data, g.ggml_type, E, INTER, ids, x, K))  # noqa: B023
            h = h * quant_triton.routed_matvec(u.data, u.ggml_type, E, INTER, ids, x, K)  # noqa: B023
            quant_triton.routed_matvec(d.data, d.ggml_type, E, H, ids, h, 1)  # noqa: B023

        ms = median_ms(routed, 20)
        read = n * K * 3 * (mb * 1e6 / E / 3) / 1e9  # slots x matrices x bytes (at most)
        print(f"  routed matvec, {n} token(s): {ms:.3f} ms ({read / ms * 1e3:.0f} GB/s of expert blocks)")


if __name__ == "__main__":
    main()
