"""GPU time of one decode attention call (tandem.gpu.decode_attention) per slice target.

python benchmarks/decode_attention_bench.py
For Qwen3-30B-A3B's heads (32 query, 4 key/value, 128 wide, a float32 cache) and several
cache sizes, captures 50 calls in a CUDA graph and prints microseconds a call for each
TARGET_PROGRAMS (how many programs the key slices aim at), so that launch costs do not
count: what a replayed decode step pays per layer.
"""

from __future__ import annotations

import torch

import tandem.gpu.decode_attention as da


def time_call(q, k, v, pos, calls: int = 50) -> float:
    da.decode_attention(q, k, v, None, 0.088, position=pos, out_dtype=torch.bfloat16)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            da.decode_attention(q, k, v, None, 0.088, position=pos, out_dtype=torch.bfloat16)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / calls)
    return best


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for capacity in (64, 544, 2048, 4096):
        q = torch.randn(1, 32, 1, 128, device="cuda", generator=gen)
        k = torch.randn(1, 4, capacity, 128, device="cuda", generator=gen)
        v = torch.randn(1, 4, capacity, 128, device="cuda", generator=gen)
        pos = torch.tensor([capacity - 1], device="cuda")
        row = []
        for target in (264, 528, 1056, 2112):
            da.TARGET_PROGRAMS = target
            row.append(f"{target}: {time_call(q, k, v, pos):6.2f} us")
        print(f"keys {capacity:5d}  " + "  ".join(row))


if __name__ == "__main__":
    main()
