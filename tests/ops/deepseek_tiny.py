"""Tiny random DeepSeek-V2/V3 models for the operator tests."""

from __future__ import annotations

import inspect
import math

import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.8,
    "mscale_all_dim": 1.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
FAMILIES = {"v2": (DeepseekV2Config, DeepseekV2ForCausalLM), "v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}


def tiny_model(
    family: str, q_lora_rank: int | None, yarn: bool, interleave: bool = True, topk_method: str = "greedy"
):
    """A 2-layer DeepSeek-V2 ("v2") or V3 ("v3") model (one dense, one MoE layer), random weights."""
    config_cls, model_cls = FAMILIES[family]
    extra = {"rope_interleave": interleave} if family == "v3" else {"topk_method": topk_method}
    config = config_cls(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=q_lora_rank,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=128,
        rope_parameters=YARN if yarn else {"rope_type": "default", "rope_theta": 10000.0}, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def cache_kw(module) -> str:
    # transformers 5.24 calls the cache `cache`; 5.17 calls it `past_key_values`.
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
