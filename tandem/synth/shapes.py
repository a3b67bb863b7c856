"""Shape specs of real MoE models, as their GGUF files describe them.

Every number comes from the model's Hugging Face config.json and is written the
way llama.cpp's converter (convert_hf_to_gguf.py, `conversion/`) writes it; the
tensor names and shapes are those llama.cpp's loader (src/models/<arch>.cpp)
asks for. `tensors.py` turns a spec into its tensor table, `metadata.py` into
its GGUF keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.errors import UnsupportedError

ARCHITECTURES = ("qwen3moe", "deepseek2", "llama")


@dataclass(frozen=True)
class MLA:
    """DeepSeek's multi-head latent attention. q_lora_rank 0: no query LoRA (V2-Lite)."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class YaRN:
    """rope_scaling of type "yarn" in config.json."""

    factor: float
    original_context: int
    beta_fast: float
    beta_slow: float
    mscale_all_dim: float


@dataclass(frozen=True)
class ShapeSpec:
    """One model's shape.

    ffn: the dense FFN width (config `intermediate_size`); for llama-arch MoE
    (Mixtral) it is also each expert's width. expert_ffn: each routed expert's
    width (`moe_intermediate_size`); 0 where ffn is used instead.
    leading_dense: the first layers with a dense FFN (`first_k_dense_replace`).
    head_dim: for deepseek2 the MLA dims in `mla` are used instead.
    params: the published total parameter count (main model, no MTP layers),
    a cross-check of the tensor table.
    """

    name: str
    arch: str
    n_layer: int
    hidden: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab: int
    context_length: int
    rope_theta: float
    rms_eps: float
    ffn: int
    n_expert: int
    n_expert_used: int
    expert_ffn: int = 0
    n_shared_expert: int = 0
    leading_dense: int = 0
    qk_norm: bool = False
    mla: MLA | None = None
    yarn: YaRN | None = None
    gating: str = "softmax"  # "softmax" or "sigmoid" (with the exp_probs_b bias)
    expert_weights_scale: float = 0.0  # routed_scaling_factor; 0: not written
    expert_weights_norm: bool = False  # norm_topk_prob, where llama.cpp reads it
    n_group: int = 0  # expert groups (n_group / topk_group); 0: not written
    topk_group: int = 0
    params: float = 0.0

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"shape {self.name!r}: {what}")

        need(self.arch in ARCHITECTURES, f"architecture {self.arch!r} is not one of {ARCHITECTURES}")
        for field in (
            "n_layer",
            "hidden",
            "n_head",
            "n_head_kv",
            "vocab",
            "ffn",
            "n_expert",
            "n_expert_used",
        ):
            need(getattr(self, field) > 0, f"{field} must be positive")
        need(self.n_expert_used <= self.n_expert, "n_expert_used exceeds n_expert")
        need(0 <= self.leading_dense < self.n_layer, "leading_dense must leave at least one MoE layer")
        need(self.n_head % self.n_head_kv == 0, "n_head must be a multiple of n_head_kv")
        need(self.gating in ("softmax", "sigmoid"), f"gating {self.gating!r} is not softmax or sigmoid")
        if self.arch == "deepseek2":
            need(self.mla is not None, "deepseek2 needs MLA dims")
            need(self.expert_ffn > 0, "deepseek2 needs expert_ffn")
        else:
            need(self.mla is None and self.head_dim > 0, "only deepseek2 has MLA; others need head_dim")
        if self.arch == "qwen3moe":
            need(self.expert_ffn > 0, "qwen3moe needs expert_ffn")
        if self.n_group:
            need(self.n_expert % self.n_group == 0, "n_expert must be a multiple of n_group")
            # llama.cpp checks topk_group < n_group only for n_group > 1 (V2-Lite writes 1 and 1)
            ok = self.topk_group == 1 if self.n_group == 1 else 0 < self.topk_group < self.n_group
            need(ok, "topk_group must be in 1..n_group-1")

    @property
    def moe_ffn(self) -> int:
        """Width of one routed expert."""
        return self.expert_ffn or self.ffn

    @property
    def has_exp_probs_b(self) -> bool:
        # DeepSeek-V3's sigmoid router carries a per-expert selection bias
        # (e_score_correction_bias), written as blk.N.exp_probs_b.bias.
        return self.gating == "sigmoid"


_QWEN3 = dict(
    arch="qwen3moe",
    n_head_kv=4,
    head_dim=128,
    vocab=151936,
    context_length=40960,
    rope_theta=1_000_000.0,
    rms_eps=1e-6,
    n_expert=128,
    n_expert_used=8,
    qk_norm=True,
)
# DeepSeek's YaRN: factor 40 over a 4k original context.
_DEEPSEEK = dict(arch="deepseek2", context_length=163840, rope_theta=10000.0, rms_eps=1e-6)
_MLA_DIMS = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)

SHAPES: dict[str, ShapeSpec] = {
    s.name: s
    for s in (
        ShapeSpec(
            name="qwen3-30b-a3b",
            n_layer=48,
            hidden=2048,
            n_head=32,
            ffn=6144,
            expert_ffn=768,
            expert_weights_norm=True,
            params=30.5e9,
            **_QWEN3,
        ),
        ShapeSpec(
            name="qwen3-235b-a22b",
            n_layer=94,
            hidden=4096,
            n_head=64,
            ffn=12288,
            expert_ffn=1536,
            expert_weights_norm=True,
            params=235e9,
            **_QWEN3,
        ),
        ShapeSpec(
            name="deepseek-v2-lite",
            n_layer=27,
            hidden=2048,
            n_head=16,
            n_head_kv=1,
            head_dim=0,
            vocab=102400,
            ffn=10944,
            n_expert=64,
            n_expert_used=6,
            expert_ffn=1408,
            n_shared_expert=2,
            leading_dense=1,
            mla=MLA(q_lora_rank=0, **_MLA_DIMS),
            yarn=YaRN(factor=40, original_context=4096, beta_fast=32, beta_slow=1, mscale_all_dim=0.707),
            gating="softmax",
            expert_weights_scale=1.0,
            n_group=1,
            topk_group=1,
            params=15.7e9,
            **_DEEPSEEK,
        ),
        ShapeSpec(
            name="deepseek-v3",
            n_layer=61,
            hidden=7168,
            n_head=128,
            n_head_kv=1,
            head_dim=0,
            vocab=129280,
            ffn=18432,
            n_expert=256,
            n_expert_used=8,
            expert_ffn=2048,
            n_shared_expert=1,
            leading_dense=3,
            mla=MLA(q_lora_rank=1536, **_MLA_DIMS),
            yarn=YaRN(factor=40, original_context=4096, beta_fast=32, beta_slow=1, mscale_all_dim=1.0),
            gating="sigmoid",
            expert_weights_scale=2.5,
            expert_weights_norm=True,
            n_group=8,
            topk_group=4,
            params=671e9,
            **_DEEPSEEK,
        ),
        ShapeSpec(
            name="mixtral-8x7b",
            arch="llama",
            n_layer=32,
            hidden=4096,
            n_head=32,
            n_head_kv=8,
            head_dim=128,
            vocab=32000,
            context_length=32768,
            rope_theta=1_000_000.0,
            rms_eps=1e-5,
            ffn=14336,
            n_expert=8,
            n_expert_used=2,
            params=46.7e9,
        ),
    )
}


def get_shape(name: str) -> ShapeSpec:
    """The spec named `name`, or an error listing the known ones."""
    spec = SHAPES.get(name)
    if spec is None:
        raise UnsupportedError(f"unknown synth shape {name!r}; known: {', '.join(SHAPES)}")
    return spec
