"""GGUF `qwen2` (Qwen2, Qwen2.5, Qwen2.5-Coder dense models) → transformers Qwen2ForCausalLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig, Qwen2Config

from tandem.weights.arch.base import Architecture, require_dense_ffn
from tandem.weights.arch.llama import DENSE_LAYER_TENSORS, common_dense_kwargs


class Qwen2(Architecture):
    gguf_name = "qwen2"
    model_type = "qwen2"
    rules_file = "qwen2.yaml"
    # Qwen2 applies rope to halves like Hugging Face, so llama.cpp does not permute Q/K here.
    layer_tensors = DENSE_LAYER_TENSORS

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        require_dense_ffn(tensor_shapes, self.gguf_name)
        kwargs = common_dense_kwargs(meta, tensor_shapes, self.gguf_name)
        kwargs.pop("head_dim")  # Qwen2Config derives it from hidden_size / heads
        return Qwen2Config(use_sliding_window=False, **kwargs)
