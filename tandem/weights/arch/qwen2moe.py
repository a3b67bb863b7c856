"""GGUF `qwen2moe` (Qwen1.5-MoE, Qwen2-57B-A14B) → transformers Qwen2MoeForCausalLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig, Qwen2MoeConfig

from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.arch.base import Architecture, Meta
from tandem.weights.arch.llama import common_dense_kwargs
from tandem.weights.arch.moe import (
    ATTENTION_TENSORS,
    FUSED_EXPERT_TENSORS,
    ROUTED_EXPERT_TENSORS,
    check_attention_shapes,
    check_expert_shapes,
    check_shapes,
    read_experts,
)

SHARED_GATE = "mlp.shared_expert_gate.weight"


class Qwen2Moe(Architecture):
    gguf_name = "qwen2moe"
    model_type = "qwen2_moe"
    rules_file = "qwen2moe.yaml"
    layer_tensors = {
        **ATTENTION_TENSORS,
        **ROUTED_EXPERT_TENSORS,
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
        SHARED_GATE: "ffn_gate_inp_shexp.weight",
    }
    fused_layer_tensors = FUSED_EXPERT_TENSORS

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        m = Meta(meta, self.gguf_name)
        kwargs = common_dense_kwargs(meta, tensor_shapes, self.gguf_name)
        ffn = kwargs["intermediate_size"]
        # llama.cpp's fallbacks when the expert widths are not in the file.
        experts = read_experts(
            m, self.gguf_name, "expert_feed_forward_length", ffn // m.int("expert_used_count")
        )
        shared = m.int("expert_shared_feed_forward_length", ffn)
        hidden, layers = kwargs["hidden_size"], kwargs["num_hidden_layers"]
        check_attention_shapes(tensor_shapes, self.gguf_name, kwargs)
        check_expert_shapes(tensor_shapes, self.gguf_name, experts, hidden, layers)
        says = f"metadata {self.gguf_name}.expert_shared_feed_forward_length = {shared} gives"
        for layer in range(layers):
            expected = {
                "ffn_gate_shexp.weight": (shared, hidden),
                "ffn_up_shexp.weight": (shared, hidden),
                "ffn_down_shexp.weight": (hidden, shared),
            }
            check_shapes(tensor_shapes, f"blk.{layer}.", expected, says)
        return Qwen2MoeConfig(
            **kwargs,
            num_experts=experts.count,
            num_experts_per_tok=experts.used,
            moe_intermediate_size=experts.width,
            shared_expert_intermediate_size=shared,
            # llama.cpp's qwen2moe graph never renormalises the top-k weights (norm_w = false),
            # and neither do the Qwen1.5/Qwen2 MoE configs.
            norm_topk_prob=False,
            qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
            use_sliding_window=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )

    def fix_quant(self, hf_name: str, tensor: QuantTensor, config: PretrainedConfig) -> QuantTensor:
        # The converter squeezes the shared expert's [1, H] sigmoid gate to a 1-D [H] tensor.
        if hf_name.endswith(SHARED_GATE) and len(tensor.shape) == 1:
            return QuantTensor(tensor.data, tensor.ggml_type, (1, tensor.shape[0]), tensor.name)
        return tensor
