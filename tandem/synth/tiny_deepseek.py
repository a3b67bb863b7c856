"""Tiny DeepSeek-V2/V3 configs and their GGUF metadata, as llama.cpp's converter writes them.

Keys follow convert_hf_to_gguf.py DeepseekV2Model.set_gguf_parameters: MLA stored as
MQA with one wide KV head (head_count_kv 1, key_length = kv_lora + rope,
value_length = kv_lora) and the per-head sizes in key/value_length_mla. With
`split_kv_b=False` the file is written the way older converters wrote it: one
`attn_kv_b` tensor and key/value_length holding the per-head sizes.
"""

from __future__ import annotations

import gguf
import numpy as np
from transformers import DeepseekV2Config, DeepseekV3Config, PretrainedConfig

VARIANTS = ("v2", "v3")


def deepseek_config(
    variant: str = "v3",
    q_lora_rank: int | None = 32,
    yarn: bool = True,
    topk_method: str = "group_limited_greedy",
    vocab_size: int = 64,
) -> PretrainedConfig:
    """Three layers (one dense, two MoE), 8 routed experts in 4 groups, one shared expert.

    Row lengths are multiples of 32 wherever llama.cpp would quantize, so Q8_0 and Q4_0 apply.
    v2: softmax gating with `topk_method` (greedy: one group, as V2-Lite); v3: biased sigmoid noaux_tc, renormalised.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    rope: dict = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        # The GGUF keeps only mscale_all_dim (as yarn_log_multiplier); DeepSeek sets both equal.
        m = 1.0 if variant == "v3" else 0.707
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "original_max_position_embeddings": 64, "mscale": m, "mscale_all_dim": m}  # fmt: skip
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, rope_parameters=rope,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    if variant == "v2":
        if topk_method == "greedy":  # GGUF keeps no topk_method: greedy files have one group
            common |= {"n_group": 1, "topk_group": 1}
        return DeepseekV2Config(**common, topk_method=topk_method, routed_scaling_factor=1.5)
    return DeepseekV3Config(**common, rope_interleave=True, routed_scaling_factor=2.5, norm_topk_prob=True)


def add_deepseek_metadata(w: gguf.GGUFWriter, config: PretrainedConfig, split_kv_b: bool) -> None:
    lora, rope = config.kv_lora_rank, config.qk_rope_head_dim
    qk = config.qk_nope_head_dim + rope
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(1 if split_kv_b else config.num_attention_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_vocab_size(config.vocab_size)
    w.add_leading_dense_block_count(config.first_k_dense_replace)
    w.add_q_lora_rank(config.q_lora_rank or 0)
    w.add_kv_lora_rank(lora)
    if split_kv_b:
        w.add_key_length(lora + rope)
        w.add_value_length(lora)
        w.add_key_length_mla(qk)
        w.add_value_length_mla(config.v_head_dim)
    else:
        w.add_key_length(qk)
        w.add_value_length(config.v_head_dim)
    w.add_rope_dimension_count(rope)
    w.add_expert_feed_forward_length(config.moe_intermediate_size)
    w.add_expert_count(config.n_routed_experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_shared_count(config.n_shared_experts)
    w.add_expert_weights_scale(config.routed_scaling_factor)
    w.add_expert_group_count(config.n_group)
    w.add_expert_group_used_count(config.topk_group)
    v3 = config.model_type == "deepseek_v3"
    w.add_expert_weights_norm(bool(v3 and config.norm_topk_prob))
    sigmoid, softmax = gguf.ExpertGatingFuncType.SIGMOID, gguf.ExpertGatingFuncType.SOFTMAX
    w.add_expert_gating_func(sigmoid if v3 else softmax)
    params = config.rope_parameters
    if params.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(params["factor"])
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(params.get("beta_fast", 32.0))
        w.add_rope_scaling_yarn_beta_slow(params.get("beta_slow", 1.0))
        w.add_rope_scaling_yarn_log_mul(0.1 * params["mscale_all_dim"])


def split_kv_b(kv_b: np.ndarray, config: PretrainedConfig) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [n_head * (nope + v), kv_lora] → attn_k_b [n_head, kv_lora, nope], attn_v_b
    [n_head, v, kv_lora], as DeepseekV2Model.modify_tensors splits it."""
    n, nope = config.num_attention_heads, config.qk_nope_head_dim
    per_head = kv_b.reshape(n, nope + config.v_head_dim, kv_b.shape[-1])
    return per_head[:, :nope].transpose(0, 2, 1).copy(), per_head[:, nope:].copy()
