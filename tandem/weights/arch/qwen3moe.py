"""GGUF `qwen3moe` (Qwen3-30B-A3B, Qwen3-235B-A22B, ...) → transformers Qwen3MoeForCausalLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig, Qwen3MoeConfig

from tandem.weights.arch.base import Architecture, Meta
from tandem.weights.arch.llama import common_dense_kwargs
from tandem.weights.arch.moe import (
    ATTENTION_TENSORS,
    FUSED_EXPERT_TENSORS,
    ROUTED_EXPERT_TENSORS,
    check_attention_shapes,
    check_expert_shapes,
    read_experts,
)


class Qwen3Moe(Architecture):
    gguf_name = "qwen3moe"
    model_type = "qwen3_moe"
    rules_file = "qwen3moe.yaml"
    layer_tensors = {
        **ATTENTION_TENSORS,
        "self_attn.o_proj.bias": "attn_output.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        **ROUTED_EXPERT_TENSORS,
    }
    fused_layer_tensors = FUSED_EXPERT_TENSORS

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        m = Meta(meta, self.gguf_name)
        kwargs = common_dense_kwargs(meta, tensor_shapes, self.gguf_name)
        ffn = kwargs["intermediate_size"]
        experts = read_experts(
            m, self.gguf_name, "expert_feed_forward_length", ffn // m.int("expert_used_count")
        )
        check_attention_shapes(tensor_shapes, self.gguf_name, kwargs)
        check_expert_shapes(
            tensor_shapes, self.gguf_name, experts, kwargs["hidden_size"], kwargs["num_hidden_layers"]
        )
        return Qwen3MoeConfig(
            **kwargs,
            num_experts=experts.count,
            num_experts_per_tok=experts.used,
            moe_intermediate_size=experts.width,
            # llama.cpp's qwen3moe graph renormalises the top-k weights (norm_w = true), as the
            # Qwen3-MoE configs do; transformers' own GGUF loader sets the same default.
            norm_topk_prob=True,
            attention_bias="blk.0.attn_q.bias" in tensor_shapes,
            use_sliding_window=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
