"""`tandem bench`: prefill and decode speed as llama-bench measures it, and decode against its memory floor."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tandem.cli.common import add_model_arguments, load_from_args
from tandem.errors import TandemError

HELP = "measure prefill and decode tokens/s (median of repeats); for MoE files, decode against the bandwidth floor"

# Ordinary prose, tokenized and repeated to the asked length: the same ids every run, no special tokens.
PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog while the river runs past the old mill, "
    "and seven clocks in the tower strike noon one after another. "
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--n-prompt", "-p", type=int, default=512, metavar="P", help="prompt tokens (default: 512)"
    )
    parser.add_argument(
        "--n-gen", "-n", type=int, default=128, metavar="N", help="decode steps (default: 128)"
    )
    parser.add_argument(
        "--repeats", "-r", type=int, default=3, metavar="R", help="timed runs after one warm-up (default: 3)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from tandem.cpu.engine import default_threads

    for flag, value in (("--n-prompt", args.n_prompt), ("--n-gen", args.n_gen), ("--repeats", args.repeats)):
        if value < 1:  # checked before the slow load
            raise TandemError(f"{flag} must be at least 1, got {value}")
    loaded = load_from_args(args)
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if isinstance(limit, int) and args.n_prompt + args.n_gen > limit:
        raise TandemError(
            f"--n-prompt + --n-gen is {args.n_prompt + args.n_gen}, over the context of {limit}"
        )
    ids = prompt_ids(loaded.tokenizer, args.n_prompt)

    runs = [timed_run(loaded, ids, args.n_gen) for _ in range(args.repeats + 1)][1:]  # the first warms up
    prefill = [r.prefill_tok_s for r in runs]
    decode = [r.decode_tok_s for r in runs]
    report: dict = {
        "model": model_name(loaded, args),
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "threads": args.threads or default_threads(),  # torch runs decode steps on one
        "repeats": args.repeats,
        "device": str(placement_device(loaded) or args.device),
        "prefill_tok_s_runs": prefill,
        "decode_tok_s_runs": decode,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
    }
    layers = getattr(loaded.model, "_tandem_decode_layers", None)
    if layers:  # how many decoder layers ran fused at decode (docs/cpu-engine.md)
        report["decode_layers_fused"] = sum(why == "fused" for why in layers.values())
        report["decode_layers"] = len(layers)
    gpu_layers = getattr(loaded.model, "_tandem_gpu_decode_layers", None)
    if gpu_layers:  # decoder layers with the fused GPU decode step (tandem/ops/decode_layer_gpu.py)
        report["gpu_decode_layers_fused"] = sum(why == "fused" for why in gpu_layers.values())
    graph = getattr(loaded.model, "_tandem_graph_decode", None)
    if graph is not None:  # decode steps replayed from a CUDA graph (tandem/engine/graph_decode.py)
        report["cuda_graph"] = "replayed" if graph.broken is None else f"off: {graph.broken}"
        report["cuda_graph_replays"] = graph.replays
        report["cuda_graph_chained"] = graph.chained  # greedy replays queued ahead of the host
        # A capture (and the eager step before it) happens in the first run's first decode
        # step; later runs' caches move onto the captured buffers and replay at once.
        report["cuda_graph_captures"] = graph.captures
        report["cuda_graph_capture_s"] = graph.capture_seconds
    streamed = [m for m in loaded.model.modules() if getattr(m, "_streamed", None)]
    if streamed:  # hybrid experts in stream order: how the stream hands them to the engine
        report["gpu_handover"] = (
            "mailbox"
            if any(call.box is not None for m in streamed for call in m._streamed.values())
            else "host-function"
        )
        from tandem.gpu.prefill_split import learned

        split = learned(streamed[0].engine_experts.engine)
        if split is not None:  # the costs the prompts' GPU/engine cut settled on (docs/hybrid.md)
            report["prefill_split_cpu_us_per_slot"] = split.slot_s * 1e6
            report["prefill_split_gpu_ms_per_expert"] = split.expert_s * 1e3
    # After the runs, so the gigabyte read buffer does not disturb them.
    report.update(memory_floor(loaded.gguf, report["decode_tok_s"]))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def placement_device(loaded) -> str | None:
    """Where the rules put modules when a GPU is among them ("cuda:0 and cpu" for a hybrid), else None."""
    devices = {p.device for p in loaded.placements}
    gpus = sorted(d for d in devices if d.startswith("cuda"))
    return " and ".join(gpus + ["cpu"] * ("cpu" in devices)) if gpus else None


def prompt_ids(tokenizer, n: int) -> list[int]:
    """`n` token ids of ordinary text, the same every call."""
    special = set(tokenizer.all_special_ids)
    base = [i for i in tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"] if i not in special]
    if not base:
        raise TandemError("the tokenizer gives no ordinary tokens for the benchmark prompt")
    return (base * (n // len(base) + 1))[:n]


def timed_run(loaded, ids: list[int], n_gen: int):
    """One prefill of `ids` into an empty cache, then exactly `n_gen` greedy single-token forwards."""
    from tandem.engine.generate import prefill_and_generate

    # No stop ids or strings, so end-of-sequence never cuts the run short; the first new token
    # comes from prefill, so n_gen + 1 tokens make n_gen timed decode forwards (llama-bench's tg).
    result = prefill_and_generate(loaded.model, loaded.tokenizer, ids, n_gen + 1, sampling=None)
    if result.n_generated != n_gen + 1:
        raise TandemError(f"generation stopped after {result.n_generated} of {n_gen + 1} tokens")
    return result


def model_name(loaded, args: argparse.Namespace) -> str:
    paths = getattr(loaded.gguf, "paths", None)
    return str(paths[0]) if paths else str(args.model)


def memory_floor(weights, decode_tok_s: float) -> dict:
    """The CPU kernel variant, read bandwidth and, for MoE GGUF files, decode as a fraction of its floor."""
    from tandem.cpu.engine import default_engine

    try:
        engine = default_engine()  # the model's pool: load_from_args sized it from --threads
        bandwidth = engine.read_bandwidth()
    except TandemError as error:  # the timings still stand without the native extension
        print(f"tandem: warning: no read bandwidth: {error}", file=sys.stderr)
        return {}
    out: dict = {
        "cpu_variant": engine.variant,
        "cpu_kernels": engine.kernels,
        "engine_threads": engine.threads,
        "numa_groups": [list(group) for group in engine.pool.node_groups],  # (node, threads) each
        "decode_prefetch_bytes": engine.prefetch,
        "decode_prefetch_level": engine.prefetch_level,
        "decode_wide": engine.decode_wide,
        "decode_streams": engine.decode_streams,
        "decode_loops": engine.decode_loops,
        "decode_tasks_per_thread": engine.decode_tasks,
        "decode_task_kib": engine.decode_task_kib,
        "decode_o_groups": engine.decode_o_groups,
        "gemm_int8_first": engine.gemm_int8_first,
        "attention_bf16": engine.attention_bf16_runs(),
        "read_bandwidth_gb_s": bandwidth / 1e9,
    }
    moe = moe_of(weights)
    if moe is None:
        return out
    if "error" in moe:
        out["moe_error"] = moe["error"]
        return out
    floor = bandwidth / moe["expert_bytes_per_token"]  # tokens/s if reading routed experts were all the work
    out.update(
        expert_bytes_per_token=moe["expert_bytes_per_token"],
        decode_floor_tok_s=floor,
        decode_fraction_of_floor=decode_tok_s / floor,
    )
    return out


def moe_of(weights) -> dict | None:
    """inspect's MoE description of a GGUF file; None for a dense one or Hugging Face weights."""
    from tandem.cli.inspect import describe
    from tandem.weights.gguf_file import GGUFFile

    if not isinstance(weights, GGUFFile):
        return None
    return describe(weights)["moe"]


def spread(values: list[float]) -> float:
    """Half the range of the repeats: the ± of the table."""
    return (max(values) - min(values)) / 2


def print_report(r: dict) -> None:
    name = Path(r["model"]).name
    width = max(len(name), len("model"))
    # Decode follows the prompt: llama-bench names that test "tgN @ dP" (its -d P fills the cache first).
    tests = ((f"pp{r['n_prompt']}", "prefill_tok_s"), (f"tg{r['n_gen']} @ d{r['n_prompt']}", "decode_tok_s"))
    test_width = max(len(test) for test, _ in tests)
    print(f"{'model':<{width}}  threads  {'test':<{test_width}} {'tok/s':>18}")
    for test, key in tests:
        speed = f"{r[key]:.2f} ± {spread(r[key + '_runs']):.2f}"
        print(f"{name:<{width}}  {r['threads']:>7}  {test:<{test_width}} {speed:>18}")
    print(f"median of {r['repeats']} runs after a warm-up, on {r['device']}; ± is half the range")
    if "decode_layers" in r:
        print(f"fused decode    {r['decode_layers_fused']} of {r['decode_layers']} decoder layers")
    if "read_bandwidth_gb_s" not in r:
        return
    print(
        f"read bandwidth  {r['read_bandwidth_gb_s']:.1f} GB/s "
        f"({r['engine_threads']} threads, {r['cpu_variant']} kernels)"
    )
    if "moe_error" in r:
        print(f"decode floor    unknown: {r['moe_error']}")
    elif "decode_floor_tok_s" in r:
        print(
            f"decode floor    {r['decode_floor_tok_s']:.2f} tok/s "
            f"({r['expert_bytes_per_token'] / (1 << 20):.2f} MiB of routed experts per token); "
            f"decode runs at {r['decode_fraction_of_floor']:.3g} of it"
        )
