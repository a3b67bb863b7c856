"""`tandem inspect`: what a GGUF file holds, and what running it will take."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

from tandem.cli.common import resolve_model_path

HELP = "describe a GGUF file: architecture, metadata, tensors by type, parameters, estimated RAM"

LONG_ARRAY = 16  # arrays longer than this are summarised, not printed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", nargs="?", help="GGUF file or directory of split parts (default: the embedded model)"
    )
    parser.add_argument("--metadata", action="store_true", help="print every metadata key")
    parser.add_argument("--tensors", action="store_true", help="list every tensor")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    group = parser.add_argument_group("placement")
    group.add_argument(
        "--plan",
        action="store_true",
        help="print where each part goes for a GPU budget, and the rules that place it",
    )
    group.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="GPU memory the plan may use, GiB (default: the free memory of the first GPU; 0: no GPU)",
    )
    group.add_argument(
        "--ctx", type=int, default=4096, metavar="N", help="KV cache tokens the plan holds (default: 4096)"
    )


def run(args: argparse.Namespace) -> int:
    from tandem.errors import TandemError
    from tandem.inject.plan import kv_bytes_per_token
    from tandem.weights.arch import config_of
    from tandem.weights.gguf_file import GGUFFile

    with GGUFFile.open(resolve_model_path(args.file)) as gguf:
        report = describe(gguf)
        try:
            config = config_of(gguf)
            report["config"] = {
                k: getattr(config, k, None) for k in CONFIG_KEYS if getattr(config, k, None) is not None
            }
            report["kv_cache_bytes_per_token"] = kv_bytes_per_token(config)
        except TandemError as error:  # an unsupported family is still worth inspecting
            report["config_error"] = str(error)
            config = None
        if args.plan:
            if config is None:
                raise TandemError(f"cannot plan a placement: {report['config_error']}")
            report["plan"] = plan_report(gguf, config, args)
        if args.metadata:
            report["metadata"] = {k: summarise(v) for k, v in gguf.metadata.items()}
        if args.tensors:
            report["tensors"] = [
                {"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "bytes": t.n_bytes}
                for t in gguf.tensors.values()
            ]
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print_report(report)
    return 0


CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "sliding_window", "tie_word_embeddings", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim",
)  # fmt: skip


def describe(gguf) -> dict:
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # count, bytes, params
    params = 0
    dense_bytes = 0
    for t in gguf.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        params += n
        row = by_type[t.ggml_type.name]
        row[0] += 1
        row[1] += t.n_bytes
        row[2] += n
        # The default rules keep the token table and routed experts quantized and dequantize
        # the rest to float32; a model without output.weight also dequantizes the table for its lm_head.
        dense_bytes += t.n_bytes if t.name == "token_embd.weight" or _is_routed_expert(t.name) else 4 * n
        if t.name == "token_embd.weight" and "output.weight" not in gguf.tensors:
            dense_bytes += 4 * n
    meta = gguf.metadata
    return {
        "file": [str(p) for p in gguf.paths],
        "architecture": gguf.architecture,
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "context_length": meta.get(f"{gguf.architecture}.context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"])
        if isinstance(meta.get("tokenizer.ggml.tokens"), list)
        else None,
        "chat_template": "tokenizer.chat_template" in meta,
        "n_tensors": len(gguf.tensors),
        "parameters": params,
        "tensor_bytes": sum(t.n_bytes for t in gguf.tensors.values()),
        "by_type": {
            k: {"tensors": v[0], "bytes": v[1], "parameters": v[2]} for k, v in sorted(by_type.items())
        },
        "ram_default_rules_bytes": dense_bytes,
        "moe": describe_moe(gguf, params),
    }


def _is_routed_expert(name: str) -> bool:
    return "_exps." in name


def describe_moe(gguf, total_params: int) -> dict | None:
    """Expert structure and the bytes of routed experts one generated token reads (the decode floor's numerator)."""
    experts = [t for t in gguf.tensors.values() if _is_routed_expert(t.name)]
    if not experts:
        return None
    arch = gguf.architecture
    count = gguf.metadata.get(f"{arch}.expert_count")
    used = gguf.metadata.get(f"{arch}.expert_used_count")
    if not isinstance(count, int) or not isinstance(used, int) or not 0 < used <= count:
        return {"error": f"{arch}.expert_count / expert_used_count missing or inconsistent"}
    layers = sorted({t.name.split(".")[1] for t in experts})
    expert_params = sum(_numel(t.shape) for t in experts)
    expert_bytes = sum(t.n_bytes for t in experts)
    shared = gguf.metadata.get(f"{arch}.expert_shared_count")
    if shared is None:
        shared = 1 if any("_shexp." in name for name in gguf.tensors) else 0
    return {
        "moe_layers": len(layers),
        "experts_per_layer": count,
        "experts_per_token": used,
        "shared_experts": shared,
        "total_parameters": total_params,
        "active_parameters": total_params - expert_params + expert_params * used // count,
        "expert_bytes_per_token": expert_bytes * used // count,
    }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_report(gguf, config, args) -> dict:
    from tandem.errors import TandemError
    from tandem.inject.loader import default_rules
    from tandem.inject.plan import GIB, plan_placement
    from tandem.inject.rules import load_rules

    if args.ctx < 1:
        raise TandemError(f"--ctx must be at least 1, got {args.ctx}")
    if args.gpu_memory is not None and args.gpu_memory < 0:
        raise TandemError(f"--gpu-memory must be at least 0, got {args.gpu_memory}")
    rules_path = default_rules(gguf.architecture, gguf.tensors)
    budget = gpu_free_bytes() if args.gpu_memory is None else int(args.gpu_memory * GIB)
    plan = plan_placement(gguf, config, load_rules(rules_path), budget, args.ctx)
    return {
        "device": plan.device,
        "budget_bytes": plan.budget,
        "ctx": plan.ctx,
        "dense_mode": plan.dense_mode,
        "dense_bytes": plan.dense_bytes - plan.table_bytes,
        "table_bytes": plan.table_bytes,
        "kv_cache_bytes": plan.kv_bytes,
        "reserve_bytes": plan.reserve,
        "gpu_bytes": plan.gpu_bytes,
        "gpu_expert_layers": list(plan.gpu_expert_layers),
        "cpu_expert_layers": list(plan.cpu_expert_layers),
        "gpu_expert_bytes": sum(plan.layer_expert_bytes[i] for i in plan.gpu_expert_layers),
        "cpu_expert_bytes": plan.cpu_expert_bytes,
        "rules": plan.rules_yaml(rules_path.read_text(encoding="utf-8")) if plan.dense_mode else "",
    }


def gpu_free_bytes() -> int:
    """Free memory of the first CUDA device, 0 where there is none."""
    import torch

    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.mem_get_info(0)[0])


def summarise(value):
    if isinstance(value, list) and len(value) > LONG_ARRAY:
        kinds = Counter(type(v).__name__ for v in value)
        return f"[{len(value)} items: {', '.join(kinds)}]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def print_report(r: dict) -> None:
    gib = 1 << 30
    print(f"file          {', '.join(r['file'])}")
    print(f"architecture  {r['architecture']}  ({r['name']})")
    print(
        f"parameters    {r['parameters'] / 1e9:.3f} B in {r['n_tensors']} tensors, {r['tensor_bytes'] / gib:.2f} GiB"
    )
    print(
        f"vocabulary    {r['vocab_size']} tokens; chat template: {'yes' if r['chat_template'] else 'no (fallback)'}"
    )
    print(f"context       {r['context_length']}")
    if "config" in r:
        c = r["config"]
        if c.get("kv_lora_rank"):  # MLA: per-head dims split into a rope and a no-rope part
            heads = (
                f"heads {c.get('num_attention_heads')} MLA (q-LoRA {c.get('q_lora_rank') or 'none'}, "
                f"kv-LoRA {c['kv_lora_rank']}, qk {c.get('qk_nope_head_dim')}+{c.get('qk_rope_head_dim')} rope, "
                f"v {c.get('v_head_dim')})"
            )
        else:
            heads = f"heads {c.get('num_attention_heads')} (kv {c.get('num_key_value_heads')}), head dim {c.get('head_dim')}"
        print(
            f"layers        {c.get('num_hidden_layers')} × hidden {c.get('hidden_size')}, "
            f"ffn {c.get('intermediate_size')}, {heads}"
        )
        print(f"KV cache      {r['kv_cache_bytes_per_token'] / 1024:.1f} KiB per token (float32)")
    else:
        print(f"config        not supported: {r['config_error']}")
    moe = r.get("moe")
    if moe and "error" in moe:
        print(f"experts       {moe['error']}")
    elif moe:
        print(
            f"experts       {moe['experts_per_layer']} per layer in {moe['moe_layers']} layers, "
            f"{moe['experts_per_token']} used per token, {moe['shared_experts']} shared"
        )
        print(
            f"active        {moe['active_parameters'] / 1e9:.3f} B of {moe['total_parameters'] / 1e9:.3f} B "
            f"parameters per token; routed experts read per token: {moe['expert_bytes_per_token'] / (1 << 20):.1f} MiB"
        )
    print(
        f"RAM estimate  {r['ram_default_rules_bytes'] / gib:.2f} GiB with the default CPU rules "
        "(token table and routed experts stay quantized, the rest float32)"
    )
    print("tensor types:")
    for name, v in r["by_type"].items():
        print(
            f"  {name:8} {v['tensors']:5} tensors  {v['bytes'] / (1 << 20):10.1f} MiB  {v['parameters'] / 1e6:10.1f} M params"
        )
    if "plan" in r:
        print_plan(r["plan"])
    if "metadata" in r:
        print("metadata:")
        for k, v in r["metadata"].items():
            print(f"  {k} = {v}")
    if "tensors" in r:
        print("tensors:")
        for t in r["tensors"]:
            print(f"  {t['name']:40} {t['type']:6} {t['shape']!s:22} {t['bytes']:>12,} B")


def _layers(layers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(spans) or "none"


def print_plan(p: dict) -> None:
    gib = 1 << 30
    print("placement:")
    if not p["dense_mode"]:
        print("  no GPU budget: everything runs on the CPU (routed experts and linear layers on the engine)")
        return
    kept = "dequantized at load" if p["dense_mode"] == "load" else "kept as GGUF blocks"
    print(
        f"  GPU {p['device']}, budget {p['budget_bytes'] / gib:.2f} GiB, planned {p['gpu_bytes'] / gib:.2f} GiB:"
    )
    rows = [
        ("attention, dense and shared weights", p["dense_bytes"], kept),
        (f"KV cache of {p['ctx']} tokens", p["kv_cache_bytes"], "float32"),
        ("headroom", p["reserve_bytes"], "activations, workspaces"),
    ]
    if p["table_bytes"]:
        rows.insert(1, ("token table", p["table_bytes"], "GGUF blocks, looked up on the GPU"))
    if p["gpu_expert_layers"]:
        rows.append(
            (
                f"routed experts, layers {_layers(p['gpu_expert_layers'])}",
                p["gpu_expert_bytes"],
                "GGUF blocks",
            )
        )
    for label, size, note in rows:
        print(f"    {label:40} {size / gib:8.2f} GiB  ({note})")
    if p["cpu_expert_layers"]:
        print(
            f"  CPU RAM: routed experts of layers {_layers(p['cpu_expert_layers'])}, "
            f"{p['cpu_expert_bytes'] / gib:.2f} GiB (GGUF blocks, on the C++ engine)"
            + ("" if p["table_bytes"] else ", and the token table")
        )
    print("rules (pass an edited copy with --rules):")
    print(p["rules"].rstrip())
