"""Where a decode step's time goes: wall time per operator class over a few tokens.

python benchmarks/profile_decode.py MODEL.gguf THREADS [TOKENS [PROMPT_TOKENS]]
Times every module's forward with perf_counter (hooks, so nested modules count
inside their parents) over TOKENS decode steps after a prompt of PROMPT_TOKENS
(default 5) and prints milliseconds per token. TOKENS 0 profiles the prompt
pass itself instead (a second one, on a fresh cache, after one that warms up);
PROFILE_OPS=1 then adds torch's own operators in a third.
Decoder layers that run fused (tandem.ops.decode_layer_cpu) are timed by the engine
instead, phase by phase, without hooks; PROFILE_HOOKS=1 hooks them too.
"""

from __future__ import annotations

# tandem first: importing it sets OMP_WAIT_POLICY=PASSIVE, which OpenMP reads when torch
# loads it; with torch first, its idle threads spin beside the engine's and every
# torch operator in the profile runs slower than in `tandem bench`.
import tandem  # noqa: F401

# isort: split
import os
import sys
import time
from collections import defaultdict

import torch

from tandem.cpu.engine import configure
from tandem.engine.kv_cache import new_cache
from tandem.inject.model import load_model
from tandem.ops.decode_layer_cpu import decoder_layers


def main() -> None:
    path, threads = sys.argv[1], int(sys.argv[2])
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    prompt = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    torch.set_num_threads(threads)
    configure(threads=threads)
    model = load_model(path, progress=False).model
    if os.environ.get("PROFILE_KEEP_TORCH_THREADS"):  # drop the one-thread decode policy
        model._forward_pre_hooks.clear()
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}

    def before(module, args):
        starts[id(module)] = time.perf_counter()

    def after(module, args, output):
        spent[type(module).__name__] += time.perf_counter() - starts.pop(id(module))

    fused = [layer.forward.fused.native for layer in decoder_layers(model) if hasattr(layer.forward, "fused")]
    hooked = [model.lm_head, model.model.norm, model.model.embed_tokens]
    if not fused or os.environ.get("PROFILE_HOOKS") or tokens == 0:
        hooked = [m for m in model.modules() if m is not model]
    for module in hooked:
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    # Random ids: a prompt of a few repeated ids would route every token to the same experts.
    vocab = min(int(model.config.vocab_size), 32000)
    token = torch.randint(100, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    if tokens == 0:
        moe_ops = [
            m.engine_experts._op for m in model.modules() if getattr(m, "engine_experts", None) is not None
        ]
        with torch.inference_mode():
            for _ in range(2):  # the first warms up
                spent.clear()
                for op in moe_ops:
                    op.set_profiling(True)
                t0 = time.perf_counter()
                model(
                    input_ids=token,
                    past_key_values=new_cache(model),
                    use_cache=True,
                    logits_to_keep=1,
                )
        total = time.perf_counter() - t0
        print(
            f"prompt of {prompt} tokens: {total * 1e3:.1f} ms ({prompt / total:.1f} tok/s), {threads} threads"
        )
        for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[:14]:
            print(f"  {name:32} {seconds * 1e3:8.1f} ms")
        if moe_ops:  # inside the engine's MoE calls, summed over layers
            phases = defaultdict(float)
            for op in moe_ops:
                for name, seconds in op.phase_seconds().items():
                    phases[name] += seconds
                op.set_profiling(False)
            print("  routed experts, inside the engine:")
            for name, seconds in phases.items():
                print(f"    {name:30} {seconds * 1e3:8.1f} ms")
        if os.environ.get("PROFILE_OPS"):  # torch's own operators in one more prompt pass
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                model(input_ids=token, past_key_values=new_cache(model), use_cache=True, logits_to_keep=1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        return
    cache = new_cache(model)
    with torch.inference_mode():
        for step in range(tokens + 2):
            if step == 2:  # prompt and one decode step done: warm
                spent.clear()
                for native in fused:
                    native.set_profiling(True)
                t0 = time.perf_counter()
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
    total = (time.perf_counter() - t0) / tokens
    print(
        f"decode {total * 1e3:.2f} ms per token ({1 / total:.2f} tok/s), {threads} threads, after {prompt} prompt tokens"
    )
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:32} {seconds / tokens * 1e3:8.2f} ms per token")
    if fused:
        phases: dict[str, float] = defaultdict(float)
        for native in fused:
            for name, seconds in native.phase_seconds().items():
                phases[name] += seconds
        inside = sum(phases.values()) / tokens
        print(f"  {len(fused)} fused layers, inside the engine: {inside * 1e3:.2f} ms per token")
        for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"    {name:30} {seconds / tokens * 1e3:8.2f} ms per token")
        print(f"  the rest (Python, torch, the lm head): {(total - inside) * 1e3:.2f} ms per token")


if __name__ == "__main__":
    main()
