"""Tiny random-weight Hugging Face models written to GGUF the way llama.cpp's converter writes them.

The inverse of tandem's architecture maps: tandem must load these back into the same
logits. Only what the loader needs is written (no tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from tandem.weights.arch import get_architecture

COMMON = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(arch: str, tie: bool = False):
    if arch == "llama":
        return LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=tie, head_dim=16)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=tie)
    if arch == "gemma3":
        return Gemma3TextConfig(
            **COMMON,
            head_dim=32,
            rope_theta=10000.0,
            sliding_window=8,
            query_pre_attn_scalar=32,
            tie_word_embeddings=True,
        )
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    config = tiny_config(arch, tie)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, not their zero/one init
            p.normal_(0, 0.3 if p.dim() == 1 else 0.08)
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row interleaving (the inverse of what tandem undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    model,
    arch: str,
    path: Path,
    quant: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    split_max_tensors: int = 0,
) -> Path:
    """Write `model` as llama.cpp would; with split_max_tensors, as a split set `path-0000N-of-0000M.gguf`."""
    config = model.config
    spec = get_architecture(arch)
    writer = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    written = set()
    for name, param in model.state_dict().items():
        target = spec.gguf_tensor_name(name, config)
        if target is None or target in written:
            continue
        written.add(target)
        w = param.detach().float().numpy().copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute(w, config.num_attention_heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute(w, config.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1
        if w.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(target, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
