"""GGUF `llama` with routed experts (Mixtral 8x7B, 8x22B) → transformers MixtralForCausalLM.

llama.cpp writes Mixtral as its `llama` architecture; the expert tensors tell them
apart, so this class claims the `llama` files that have them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from transformers import MixtralConfig, PretrainedConfig

from tandem.errors import UnsupportedError
from tandem.weights.arch.base import Meta
from tandem.weights.arch.llama import Llama, common_dense_kwargs
from tandem.weights.arch.moe import (
    ATTENTION_TENSORS,
    FUSED_EXPERT_TENSORS,
    ROUTED_EXPERT_TENSORS,
    check_attention_shapes,
    check_expert_shapes,
    read_experts,
)


class Mixtral(Llama):
    """Llama's attention (and its Q/K row permutation, inherited) with routed experts."""

    model_type = "mixtral"
    rules_file = "mixtral.yaml"
    layer_tensors = {**ATTENTION_TENSORS, **ROUTED_EXPERT_TENSORS}
    fused_layer_tensors = FUSED_EXPERT_TENSORS

    @classmethod
    def claims(cls, tensor_names: Collection[str]) -> bool:
        return any(".ffn_gate_inp." in name or "_exps." in name for name in tensor_names)

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        m = Meta(meta, self.gguf_name)
        kwargs = common_dense_kwargs(meta, tensor_shapes, self.gguf_name)
        if "blk.0.attn_q.bias" in tensor_shapes:
            raise UnsupportedError("llama files with routed experts and attention biases are not supported")
        if "rope_freqs.weight" in tensor_shapes and kwargs["rope_scaling"] is None:
            raise UnsupportedError(
                "llama files with a rope_freqs tensor (Llama 3.1+ rope scaling) are not supported yet"
            )
        # llama.cpp sizes a llama file's experts by feed_forward_length.
        experts = read_experts(m, self.gguf_name, "feed_forward_length", None)
        check_attention_shapes(tensor_shapes, self.gguf_name, kwargs)
        check_expert_shapes(
            tensor_shapes, self.gguf_name, experts, kwargs["hidden_size"], kwargs["num_hidden_layers"]
        )
        # Mixtral's router always renormalises its top-k weights, as llama.cpp does for llama.
        return MixtralConfig(
            **kwargs,
            num_local_experts=experts.count,
            num_experts_per_tok=experts.used,
            sliding_window=None,
        )
