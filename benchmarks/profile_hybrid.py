"""Where a hybrid decode step's time goes: the GPU's kernels, the CPU experts, the hand-overs.

python benchmarks/profile_hybrid.py MODEL.gguf THREADS GPU_GIB [STEPS [PROMPT]]
Loads the model with the plan for GPU_GIB, decodes STEPS (default 32) tokens after a
prompt of PROMPT tokens (default 16; `tandem bench` decodes after 512), and prints per
step: the wall time of a replayed step, the GPU's kernel time inside it (torch.profiler
over a few replays), and the routed experts' time on the engine alone (the same
one-token calls through the host function's C pointer, one layer after another, with
no Python between them). What is left is the hand-over
between them: copies, wake-ups, idle workers; replays with the mailbox answering every
call at once (its dry mode) time the GPU's work and the hand-overs without the engine.
"""

from __future__ import annotations

import tandem  # noqa: F401  (first: OMP_WAIT_POLICY for torch's threads)

# isort: split
import ctypes
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tandem.cpu.engine import configure, default_engine, host_run_fn
from tandem.engine.generate import prefill_and_generate
from tandem.inject.model import load_model
from tandem.ops.experts_cpu import ExpertsCPU


class Ids:
    def decode(self, ids, **_):
        return ""

    def convert_ids_to_tokens(self, ids):
        return ["" for _ in ids]


def main() -> None:
    path, threads, gib = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    n_prompt = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    configure(threads=threads)
    loaded = load_model(path, gpu_memory=gib, plan_ctx=4096)
    model = loaded.model
    prompt = [100 + i % 1000 for i in range(n_prompt)]
    prefill_and_generate(model, Ids(), prompt, 4)  # warm-up and capture
    result = prefill_and_generate(model, Ids(), prompt, steps + 1)
    graph = getattr(model, "_tandem_graph_decode", None)
    print(
        f"decode after {n_prompt} prompt tokens: {result.decode_tok_s:.2f} tok/s, "
        f"{1000 / result.decode_tok_s:.2f} ms a step; graph: "
        f"{'replayed' if graph is not None and graph.broken is None else 'none'}"
    )
    if graph is not None and graph.graph is not None:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                graph.graph.replay()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        gpu_us = sum(e.self_device_time_total for e in kernels) / 5
        launches = sum(e.count for e in kernels) // 5
        print(f"GPU kernels per step: {gpu_us / 1000:.2f} ms, {launches} launches ({len(kernels)} kinds):")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total):
            print(f"  {e.self_device_time_total / 5 / 1000:8.3f} ms  {e.count // 5:5d}x  {e.key[:90]}")
    experts = [m for m in model.modules() if isinstance(m, ExpertsCPU) and m.engine_experts is not None]
    boxes = {id(c.box): c.box for m in experts for c in m._streamed.values() if c.box is not None}
    if graph is not None and graph.graph is not None and boxes:
        # The same replays with the mailbox answering every call at once: the GPU's work and
        # the hand-overs alone, without the engine's time.
        done = torch.cuda.Event(blocking=True)  # a sleeping wait, as generation's

        def replays() -> float:
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                graph.graph.replay()
                done.record()
                done.synchronize()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1000

        real = replays()
        for box in boxes.values():
            box.server.dry = True
        dry = replays()
        for box in boxes.values():
            box.server.dry = False
        print(
            f"replayed step {real:.2f} ms; with the engine's calls answered at once {dry:.2f} ms "
            f"({dry * 1000 / max(1, len(experts)):.0f} us a MoE layer)"
        )
    if experts:
        k = model.config.num_experts_per_tok
        gen = torch.Generator().manual_seed(0)
        # The hybrid step's own call: a native record run through its C function pointer
        # (what the stream's host function does), so no Python sits between the layers.
        run = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(host_run_fn())
        records = []
        for m in experts:
            x, out = torch.randn(1, m.hidden_size, generator=gen), torch.empty(1, m.hidden_size)
            ids = torch.randperm(m.num_experts, generator=gen)[:k].view(1, k).contiguous()
            records.append(m.engine_experts.host_call(x, ids, torch.rand(1, k, generator=gen), out))
        # From the core of the pool's thread 0, as the mailbox's serving thread runs them: an
        # unpinned caller may share a worker's core, and the experts' one loop waits on its
        # slowest task.
        cpus = list(default_engine().pool.cpus)
        affinity = os.sched_getaffinity(0)
        if cpus:
            os.sched_setaffinity(0, {cpus[0]})
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            for record in records:
                run(record.address)
            times.append(time.perf_counter() - t0)
        os.sched_setaffinity(0, affinity)
        ms = statistics.median(times) * 1000
        print(
            f"experts alone on the engine: {ms:.2f} ms a step ({len(experts)} layers, "
            f"{ms / len(experts) * 1000:.0f} us each)"
        )


if __name__ == "__main__":
    main()
