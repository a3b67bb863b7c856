"""GGUF `llama` (Llama 2/3, Mistral-style dense models) → transformers LlamaForCausalLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import LlamaConfig, PretrainedConfig

from tandem.errors import UnsupportedError
from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.arch.base import (
    Architecture,
    Meta,
    require_dense_ffn,
    rope_scaling,
    token_ids,
    vocab_size_of,
)

DENSE_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def common_dense_kwargs(
    meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], arch: str
) -> dict[str, Any]:
    """Config fields shared by the llama-like dense families (llama, qwen2)."""
    m = Meta(meta, arch)
    vocab = vocab_size_of(shapes)
    heads = m.int("attention.head_count")
    hidden = m.int("embedding_length")
    head_dim = m.int("attention.key_length", hidden // heads)
    ids = token_ids(meta, vocab)
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": m.int("feed_forward_length"),
        "num_hidden_layers": m.int("block_count", maximum=4096),
        "num_attention_heads": heads,
        "num_key_value_heads": m.int("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": m.float("attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": m.int("context_length", 4096, maximum=1 << 30),
        "rope_theta": m.float("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling(m),
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
    }


class Llama(Architecture):
    gguf_name = "llama"
    model_type = "llama"
    rules_file = "llama.yaml"
    layer_tensors = DENSE_LAYER_TENSORS

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        require_dense_ffn(tensor_shapes, self.gguf_name)
        kwargs = common_dense_kwargs(meta, tensor_shapes, self.gguf_name)
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
        if "rope_freqs.weight" in tensor_shapes and kwargs["rope_scaling"] is None:
            # Llama 3.1+ stores its frequency factors as a tensor; the Hugging Face config
            # needs the parameters that produced them. They are checked against the tensor at load.
            raise UnsupportedError(
                "llama files with a rope_freqs tensor (Llama 3.1+ rope scaling) are not supported yet"
            )
        return LlamaConfig(**kwargs)

    def fix_quant(self, hf_name: str, tensor: QuantTensor, config: PretrainedConfig) -> QuantTensor:
        # llama.cpp's converter interleaves the two rotary halves of every Q and K head
        # (it applies rope to adjacent pairs); Hugging Face applies it to the two halves.
        # Rows are whole blocks, so the inverse permutation moves rows without touching blocks.
        if hf_name.endswith("self_attn.q_proj.weight"):
            return tensor.select_rows(_unpermute_index(tensor.shape[0], config.num_attention_heads))
        if hf_name.endswith("self_attn.k_proj.weight"):
            return tensor.select_rows(_unpermute_index(tensor.shape[0], config.num_key_value_heads))
        return tensor

    def fix_dense(self, hf_name: str, tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
        if hf_name.endswith("self_attn.q_proj.bias"):
            return tensor[_unpermute_index(tensor.shape[0], config.num_attention_heads)]
        if hf_name.endswith("self_attn.k_proj.bias"):
            return tensor[_unpermute_index(tensor.shape[0], config.num_key_value_heads)]
        return tensor


def _unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns llama.cpp's interleaved rotary layout back into halves."""
    half = rows // heads // 2
    if half * 2 * heads != rows:
        raise UnsupportedError(f"{rows} rows cannot be split into {heads} rotary heads")
    # GGUF row (h, i, j) for i < half, j < 2 holds HF row (h, j, i).
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)
