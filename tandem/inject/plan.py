"""Placement on a GPU memory budget: which parts of a model go to the GPU, which stay on the CPU.

A plan puts the attention, dense and shared-expert weights, norms, routers, the LM head
and the KV cache on the GPU, and keeps the routed experts in CPU RAM for the C++ engine,
except as many whole layers' experts as the rest of the budget holds: the last layers
first, as llama.cpp's `--n-cpu-moe N` keeps the first N layers' experts on the CPU. A
model that fits whole goes whole to the GPU. The token table goes to the GPU as its GGUF
blocks where the GPU kernels read its type and the budget holds it beside the dense
weights and the cache (ahead of any experts): a lookup there needs nothing from the host,
so a captured decode step takes it in and the next step can be queued before the host
sees the token. Otherwise it stays in CPU RAM (a lookup dequantizes a few rows and copies
them over).

The GPU-side weights are dequantized once at load ("load": bf16 for linear layers,
float32 for norms and routers) when that fits beside the KV cache, else they stay GGUF
blocks on the GPU ("none") where Triton kernels read them. A plan is a list of rules in
the KTransformers schema, placed before the family's default rules (`rules_yaml`):
`tandem inspect --plan` prints them as a file to edit and pass with `--rules`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from tandem.errors import TandemError
from tandem.inject.rules import Rule

GIB = 1 << 30
# Headroom for activations, workspaces and the allocator: 1 GiB plus 5% of the budget.
RESERVE_FIXED = GIB
RESERVE_FRACTION = 0.05

_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down|gate_up)_exps\.")
# Types whose GGUF blocks the GPU kernels read in place (tandem/gpu/quant_triton.py),
# with the columns one of their chunks covers.
_GPU_BLOCK_TYPES = {"Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
_ATTENTION = re.compile(r"^blk\.\d+\.attn_")


class PlanError(TandemError):
    """The budget cannot hold what must be on the GPU."""


@dataclass(frozen=True)
class Plan:
    device: str  # where the GPU parts go ("cuda:0"), or "cpu" for a plan without a GPU
    budget: int  # bytes
    ctx: int  # tokens the KV cache holds
    dense_mode: str  # "load", "none", or "" (no GPU)
    dense_bytes: int  # the GPU-side weights as they will sit there
    kv_bytes: int
    reserve: int
    layer_expert_bytes: dict[int, int] = field(default_factory=dict)  # routed experts' GGUF bytes per layer
    gpu_expert_layers: tuple[int, ...] = ()
    # The Hugging Face experts classes the family's rules give the CPU engine (DeepSeek's
    # rules name V2's and V3's; only the one the config builds matches).
    expert_classes: tuple[str, ...] = ()
    table_bytes: int = 0  # the token table's blocks on the GPU (within dense_bytes), 0: in CPU RAM

    @property
    def table_on_gpu(self) -> bool:
        return self.table_bytes > 0

    @property
    def cpu_expert_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.layer_expert_bytes) - set(self.gpu_expert_layers)))

    @property
    def gpu_bytes(self) -> int:
        if self.dense_mode == "":
            return 0
        experts = sum(self.layer_expert_bytes[layer] for layer in self.gpu_expert_layers)
        return self.dense_bytes + self.kv_bytes + self.reserve + experts

    @property
    def cpu_expert_bytes(self) -> int:
        return sum(self.layer_expert_bytes[layer] for layer in self.cpu_expert_layers)

    def placement_yaml(self) -> str:
        """The rules that make this placement, to go before the family's default rules."""
        if self.dense_mode == "":
            return ""
        gpu = f'"{self.device}"'
        rules = []  # without a rule here the family's keeps the token table in CPU RAM
        if self.table_on_gpu:
            rules.append(
                _rule(
                    {"name": r"^model\.embed_tokens$"},
                    "tandem.ops.embedding.QuantEmbedding",
                    {"generate_device": gpu, "table_device": gpu},
                )
            )
        for expert_class in self.expert_classes:
            if self.gpu_expert_layers:
                layers = "|".join(str(layer) for layer in self.gpu_expert_layers)
                rules.append(
                    _rule(
                        {"name": rf"^model\.layers\.(?:{layers})\.", "class": expert_class},
                        "tandem.ops.experts.QuantExperts",
                        {"generate_device": gpu},
                    )
                )
            if self.cpu_expert_layers:
                rules.append(
                    _rule(
                        {"class": expert_class},
                        "tandem.ops.experts_cpu.ExpertsCPU",
                        {"generate_device": "cpu"},
                    )
                )
        rules.append(
            _rule(
                {"class": "torch.nn.Linear"},
                "tandem.ops.linear_gpu.QuantLinearGPU",
                {"generate_device": gpu, "dequant": self.dense_mode},
            )
        )
        head = (
            f"# Placement for a GPU budget of {self.budget / GIB:.2f} GiB on {self.device}, "
            f"{self.ctx} tokens of KV cache (tandem's plan);\n# the family's default rules follow.\n"
        )
        return head + "".join(rules)

    def rules_yaml(self, default_rules_text: str) -> str:
        """The whole rule file: the placement, then the family's default rules."""
        return self.placement_yaml() + default_rules_text


def _rule(match: dict[str, str], cls: str, kwargs: dict[str, str]) -> str:
    lines = ["- match:\n"]
    lines += [f"    {key}: {_quote(value)}\n" for key, value in match.items()]
    args = ", ".join(f"{key}: {value}" for key, value in kwargs.items())
    lines.append(f"  replace:\n    class: {cls}\n    kwargs: {{{args}}}\n")
    return "".join(lines)


def _quote(value: str) -> str:
    return (
        '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if "\\" in value or ":" in value
        else value
    )


ALLOC_GRANULE = 512  # torch's CUDA caching allocator rounds every allocation up to this


def kv_bytes_per_token(config) -> int:
    """KV cache bytes one token takes over all layers (float32, the cache's dtype)."""
    latent = getattr(config, "kv_lora_rank", None)
    if latent:  # MLA caches the compressed latent and the rope key, shared by all heads
        return config.num_hidden_layers * (latent + config.qk_rope_head_dim) * 4
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # K and V


def expert_classes_of(rules: list[Rule]) -> tuple[str, ...]:
    """The experts classes the family's rules give to the CPU engine (none: a dense family)."""
    found: list[str] = []
    for rule in rules:
        if (
            rule.replace_class is not None
            and rule.replace_class.__name__ == "ExpertsCPU"
            and rule.match_class
        ):
            name = f"{rule.match_class.__module__}.{rule.match_class.__qualname__}"
            if name not in found:
                found.append(name)
    return tuple(found)


def mla_element_bytes(rules: list[Rule]) -> int | None:
    """Bytes per weight of the MLA operator the rules give (its `dtype`, float32 by
    default), or None where no rule uses it."""
    for rule in rules:
        if rule.replace_class is not None and rule.replace_class.__name__ == "MLAttention":
            return 2 if rule.kwargs.get("dtype") in ("bfloat16", "float16") else 4
    return None


def default_reserve(budget: int) -> int:
    return RESERVE_FIXED + int(RESERVE_FRACTION * budget)


def plan_placement(
    gguf,
    config,
    default_rules: list[Rule],
    budget: int,
    ctx: int,
    device: str = "cuda:0",
    reserve: int | None = None,
) -> Plan:
    """Where each part of the model in `gguf` goes for a GPU of `budget` bytes (0: no GPU)."""
    if budget < 0 or ctx < 1:
        raise PlanError(
            f"a plan needs a budget of at least 0 bytes and a context of at least 1 token, got {budget}, {ctx}"
        )
    layer_bytes: dict[int, int] = {}
    dense_load = dense_none = 0
    mla_bytes = mla_element_bytes(default_rules)
    tied = "output.weight" not in gguf.tensors
    for t in gguf.tensors.values():
        found = _EXPERT.match(t.name)
        if found:
            layer = int(found.group(1))
            layer_bytes[layer] = layer_bytes.get(layer, 0) + allocated(t.n_bytes)
            continue
        if t.name == "token_embd.weight" and not tied:
            continue  # the token table: below
        load, none = _gpu_bytes(t)
        if mla_bytes and len(t.shape) >= 2 and _ATTENTION.match(t.name):  # MLAttention: its dtype
            load = none = allocated(mla_bytes * math.prod(t.shape))
        dense_load += load
        dense_none += none
    # The rotary embeddings' inverse frequencies (inv_freq and its original; Gemma 3 has two
    # embeddings): buffers the loader moves to the GPU beside the weights.
    head_dim = getattr(config, "qk_rope_head_dim", None) or getattr(config, "head_dim", None)
    head_dim = head_dim or config.hidden_size // config.num_attention_heads
    dense_load += 4 * allocated(head_dim // 2 * 4)
    dense_none += 4 * allocated(head_dim // 2 * 4)
    if budget == 0:
        return Plan("cpu", 0, ctx, "", 0, 0, 0, layer_bytes, (), expert_classes_of(default_rules))
    table = _gpu_table_bytes(gguf.tensors.get("token_embd.weight"))
    kv = ctx * kv_bytes_per_token(config)
    reserve = default_reserve(budget) if reserve is None else reserve
    layers = sorted(layer_bytes)
    whole = dense_load + table + kv + reserve + sum(layer_bytes.values())
    expert_classes = expert_classes_of(default_rules)
    if whole <= budget:
        return Plan(
            device, budget, ctx, "load", dense_load + table, kv, reserve, layer_bytes, tuple(layers),
            expert_classes, table_bytes=table,
        )  # fmt: skip
    mode, dense = ("load", dense_load) if dense_load + kv + reserve <= budget else ("none", dense_none)
    if dense + kv + reserve > budget:
        raise PlanError(
            f"a GPU budget of {budget / GIB:.2f} GiB cannot hold the attention and dense weights "
            f"({dense / GIB:.2f} GiB as GGUF blocks), a KV cache of {ctx} tokens ({kv / GIB:.2f} GiB) "
            f"and {reserve / GIB:.2f} GiB of headroom; lower --ctx or raise --gpu-memory"
        )
    if dense + table + kv + reserve > budget:
        table = 0  # the table stays in CPU RAM
    dense += table
    spare = budget - dense - kv - reserve
    on_gpu: list[int] = []
    for layer in reversed(layers):  # the last layers first, whole layers only
        if layer_bytes[layer] > spare:
            break
        on_gpu.append(layer)
        spare -= layer_bytes[layer]
    return Plan(
        device, budget, ctx, mode, dense, kv, reserve, layer_bytes, tuple(sorted(on_gpu)), expert_classes,
        table_bytes=table,
    )  # fmt: skip


def _gpu_reads_blocks(t) -> bool:
    """Whether the GPU's kernels read t's GGUF blocks in place (its type, whole blocks per row)."""
    chunk = _GPU_BLOCK_TYPES.get(t.ggml_type.name)
    return chunk is not None and t.shape[-1] % chunk == 0


def _gpu_table_bytes(t) -> int:
    """The token table's blocks on the GPU, or 0 where its kernels cannot read them."""
    if t is None or len(t.shape) != 2:
        return 0
    return allocated(t.n_bytes) if _gpu_reads_blocks(t) else 0


def _gpu_bytes(t) -> tuple[int, int]:
    """A non-expert tensor on the GPU: (dequantized at load, kept as blocks where kernels read them)."""
    n = math.prod(t.shape)
    name = t.ggml_type.name
    if len(t.shape) < 2 or name == "F32" or "ffn_gate_inp" in t.name:  # norms, biases, routers: float32
        return allocated(4 * n), allocated(4 * n)
    kept = t.n_bytes if _gpu_reads_blocks(t) else 2 * n
    return allocated(2 * n), allocated(kept)


def allocated(n_bytes: int) -> int:
    """What one tensor of n_bytes takes from torch's CUDA allocator (whole blocks of 512 bytes)."""
    return -(-n_bytes // ALLOC_GRANULE) * ALLOC_GRANULE
