"""The engine alone on a model's routed experts: one decode token = one MoE call per layer.

python benchmarks/moe_op_bench.py MODEL.gguf THREADS [TOKENS [copy|wide-ab|prefetch-sweep|wide-prefetch|streams|split|phases]]
Builds the engine's expert op for every layer of the file (on the file's mapped pages,
or with `copy` on copies in anonymous memory: huge pages where THP_MEM_ALLOC_ENABLE=1
asks torch for them), then times tokens
that route to 8 random experts per layer (no attention, no Python model around
it), and prints ms per token and the bytes-per-token bandwidth it reached: the
engine's own share of a decode step, to set against `tandem bench`. `wide-ab` times the
one-token kernels' 512-bit forms against their 256-bit loops (TANDEM_CPU_DECODE_WIDE),
`prefetch-sweep` the one-token prefetch's distances and levels (TANDEM_CPU_PREFETCH,
TANDEM_CPU_PREFETCH_LEVEL), `wide-prefetch` both forms at three distances, `streams` the one-token kernels' 1-8 streams
of rows (TANDEM_CPU_DECODE_STREAMS), `split` one loop at 2, 4 and 8 tasks a thread
(TANDEM_CPU_DECODE_TASKS) and tasks of at most 64 KiB, 256 KiB and any size
(TANDEM_CPU_DECODE_TASK_KIB) against two loops (TANDEM_CPU_DECODE_LOOPS), each in
alternating rounds of one process, so that the
machine's drift falls on every setting alike. `phases` splits a token's calls into the op's
phases (its phase clocks, in two loops) and gives gate/up's and down's bandwidth apart.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch

from tandem.cpu.engine import CPUEngine, _native
from tandem.weights.gguf_file import GGUFFile


def main() -> None:
    path, threads = sys.argv[1], int(sys.argv[2])
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    mode = sys.argv[4] if len(sys.argv) > 4 else ""
    gguf = GGUFFile.open(path)
    engine = CPUEngine(threads=threads)
    layers = []
    for i in range(1000):
        names = [f"blk.{i}.ffn_{part}_exps.weight" for part in ("gate", "up", "down")]
        if f"blk.{i}.attn_norm.weight" not in gguf.tensors:
            break
        if names[0] not in gguf.tensors:  # a dense layer (DeepSeek's first ones)
            continue
        tensors = [gguf.tensor(n) for n in names]
        if mode == "copy":
            tensors = [dataclasses.replace(t, data=t.data.clone()) for t in tensors]
        layers.append(engine.experts(*tensors))
    n_experts, hidden = layers[0].n_experts, layers[0].hidden
    per_expert = sum(t.numel() for t in layers[0].tensors) / n_experts  # bytes of one expert
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, hidden, generator=g)
    w = torch.full((1, 8), 1 / 8)
    routes = [[torch.randperm(n_experts, generator=g)[:8][None] for _ in layers] for _ in range(tokens + 2)]
    read = per_expert * 8 * len(layers)

    def seconds_per_token() -> float:
        for step, route in enumerate(routes):
            if step == 2:
                t0 = time.perf_counter()
            for layer, ids in zip(layers, route, strict=True):
                layer(x, ids, w)
        return (time.perf_counter() - t0) / tokens

    settings = {
        "wide-ab": {
            f"decode_wide={int(on)}": (lambda on=on: _native().set_decode_wide(on)) for on in (True, False)
        },
        "prefetch-sweep": {
            f"prefetch={ahead} level={level}": (
                lambda a=ahead, lv=level: _native().set_decode_prefetch(a, lv)
            )
            for ahead, level in ((2048, 0), (0, 0), (1024, 0), (4096, 0), (8192, 0), (2048, 1), (4096, 1))
        },
        "wide-prefetch": {
            f"decode_wide={int(on)} prefetch={ahead}": (
                lambda on=on, a=ahead: (_native().set_decode_wide(on), _native().set_decode_prefetch(a, 0))
            )
            for ahead in (2048, 0, 4096)
            for on in (True, False)
        },
        "streams": {
            f"decode_streams={n}": (lambda n=n: _native().set_decode_streams(n)) for n in (1, 2, 4, 6, 8)
        },
        "split": {
            (f"one loop, {tasks} tasks a thread, {kib} KiB at most" if one else "two loops"): (
                lambda one=one, tasks=tasks, kib=kib: _native().set_decode_split(one, tasks, kib << 10)
            )
            for one, tasks, kib in (
                (False, 4, 256),
                (True, 2, 256),
                (True, 4, 256),
                (True, 8, 256),
                (True, 4, 1 << 20),
                (True, 4, 64),
            )
        },
    }.get(mode)
    if settings:
        runs: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(3):
            for name, apply in settings.items():
                apply()
                runs[name].append(read / seconds_per_token() / 1e9)
        _native().set_decode_wide(engine.decode_wide)
        _native().set_decode_streams(engine.decode_streams)
        _native().set_decode_split(
            engine.decode_loops == 1, engine.decode_tasks, engine.decode_task_kib << 10
        )
        _native().set_decode_prefetch(engine.prefetch, engine.prefetch_level)
        for name, values in runs.items():
            print(
                f"{len(layers)} MoE layers, {threads} threads, {name}: GB/s by round "
                f"{', '.join(f'{v:.1f}' for v in values)}; median {statistics.median(values):.1f}"
            )
        print(f"read bandwidth {engine.read_bandwidth() / 1e9:.1f} GB/s")
        return
    if mode == "phases":
        _native().set_decode_split(False)  # one loop times gate/up and down as one phase
        ops = [layer._op for layer in layers]
        for op in ops:
            op.set_profiling(True)
        seconds = seconds_per_token()
        spent: dict[str, float] = {}
        for op in ops:
            for name, value in op.phase_seconds().items():
                spent[name] = spent.get(name, 0.0) + value
            op.set_profiling(False)
        steps = len(routes)  # the clocks ran through the warm-up steps too
        matrix_bytes = [
            sum(layer.tensors[m].numel() / layer.n_experts * 8 for layer in layers) for m in range(3)
        ]
        moved = {"gate_up": matrix_bytes[0] + matrix_bytes[1], "down": matrix_bytes[2]}
        print(f"{len(layers)} MoE layers, {threads} threads: {seconds * 1e3:.2f} ms per token in all")
        for name, value in spent.items():
            if value == 0:
                continue
            ms = value / steps * 1e3
            rate = f", {moved[name] / (value / steps) / 1e9:.1f} GB/s" if name in moved else ""
            print(f"  {name:20} {ms:7.3f} ms per token{rate}")
        print(f"read bandwidth {engine.read_bandwidth() / 1e9:.1f} GB/s")
        return
    seconds = seconds_per_token()
    print(
        f"{len(layers)} MoE layers, {threads} threads{', copied' if mode == 'copy' else ''}: "
        f"{seconds * 1e3:.2f} ms per token, "
        f"{read / 1e9:.3f} GB of experts per token, {read / seconds / 1e9:.1f} GB/s; "
        f"read bandwidth {engine.read_bandwidth() / 1e9:.1f} GB/s"
    )


if __name__ == "__main__":
    main()
