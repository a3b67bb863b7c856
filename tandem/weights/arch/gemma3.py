"""GGUF `gemma3` (text part of Gemma 3) → transformers Gemma3ForCausalLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import Gemma3TextConfig, PretrainedConfig

from tandem.weights.arch.base import (
    Architecture,
    Meta,
    require_dense_ffn,
    rope_scaling,
    token_ids,
    vocab_size_of,
)

# llama.cpp fixes these for every Gemma 3 (they are not in the file's metadata).
SLIDING_WINDOW_PATTERN = 6  # five local layers, then one global
LOCAL_ROPE_BASE = 10000.0
GEMMA3_27B_LAYERS = 62  # the one size whose query scale uses hidden/heads instead of head_dim


class Gemma3(Architecture):
    gguf_name = "gemma3"
    model_type = "gemma3_text"
    rules_file = "gemma3.yaml"
    layer_tensors = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        require_dense_ffn(tensor_shapes, self.gguf_name)
        m = Meta(meta, self.gguf_name)
        vocab = vocab_size_of(tensor_shapes)
        hidden = m.int("embedding_length")
        heads = m.int("attention.head_count")
        head_dim = m.int("attention.key_length", 256)
        layers = m.int("block_count", maximum=4096)
        ids = token_ids(meta, vocab)
        softcap = meta.get("gemma3.final_logit_softcapping")
        return Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=m.int("feed_forward_length"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=m.int("attention.head_count_kv", heads),
            head_dim=head_dim,
            rms_norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-6),
            max_position_embeddings=m.int("context_length", 32768, maximum=1 << 30),
            rope_theta=m.float("rope.freq_base", 1_000_000.0),
            rope_local_base_freq=LOCAL_ROPE_BASE,
            rope_scaling=rope_scaling(m),
            sliding_window=m.int("attention.sliding_window", 4096, maximum=1 << 30),
            sliding_window_pattern=SLIDING_WINDOW_PATTERN,
            query_pre_attn_scalar=hidden // heads if layers == GEMMA3_27B_LAYERS else head_dim,
            final_logit_softcapping=float(softcap) if isinstance(softcap, (int, float)) else None,
            tie_word_embeddings="output.weight" not in tensor_shapes,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["padding"],
        )

    def fix_dense(self, hf_name: str, tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
        # llama.cpp's converter stores Gemma's norm weights as 1 + w (ggml multiplies by the
        # weight); Hugging Face's Gemma3RMSNorm multiplies by 1 + w itself.
        if hf_name.endswith("norm.weight"):
            return tensor - 1
        return tensor
