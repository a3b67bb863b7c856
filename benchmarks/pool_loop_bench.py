"""What a parallel loop of the engine's pool costs, empty and with decode-sized tasks.

python benchmarks/pool_loop_bench.py THREADS [ROUNDS]
Times loops back to back (tandem._cpu.loop_seconds): each of n tasks reads its own
part of a 1 GiB buffer with the bandwidth loop's loads, a fresh part every loop, so
the bytes come from memory as a decode step's weights do. Shapes: empty loops (the
pool's own cost: waking, handing out, stealing, the barrier) and loops the size of a
Qwen3-30B-A3B layer's phases on 16 threads (q/k/v 6 MB in 66 tasks, o 4.7 MB in 64,
the experts 23 MB in 256). Each shape runs with idle threads reading another's range
before taking from it (peek, the default) and without, in alternating rounds; prints
the median µs per loop and, where tasks read, the bytes over time.
"""

from __future__ import annotations

import statistics
import sys

import torch

from tandem.cpu.engine import CPUEngine, _native

SHAPES = [  # (label, tasks, bytes a task)
    ("empty, 16 tasks", 16, 0),
    ("empty, 64 tasks", 64, 0),
    ("q/k/v: 66 x 92 KiB", 66, 92 << 10),
    ("o: 64 x 72 KiB", 64, 72 << 10),
    ("experts: 256 x 90 KiB", 256, 90 << 10),
]


def main() -> None:
    threads = int(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    engine = CPUEngine(threads=threads)
    buffer = torch.ones(1 << 30, dtype=torch.uint8)  # touched: no page faults in the loops
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(rounds):
        for label, tasks, task_bytes in SHAPES:
            loops = 2000 if task_bytes == 0 else 200
            for peek in (True, False):
                engine.pool.steal_peek = peek
                seconds = _native().loop_seconds(
                    engine.pool, engine.kernels, buffer.data_ptr(), buffer.numel(), tasks, task_bytes, loops
                )
                times.setdefault((label, peek), []).append(seconds)
    engine.pool.steal_peek = True
    print(f"{threads} threads, {engine.kernels} read loop, median of {rounds} rounds")
    for label, tasks, task_bytes in SHAPES:
        cells = []
        for peek in (True, False):
            seconds = statistics.median(times[(label, peek)])
            rate = f", {tasks * task_bytes / seconds / 1e9:.1f} GB/s" if task_bytes else ""
            cells.append(f"{'peek' if peek else 'take'} {seconds * 1e6:.2f} µs{rate}")
        print(f"  {label:24} " + "; ".join(cells))


if __name__ == "__main__":
    main()
