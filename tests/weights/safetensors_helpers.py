"""Tiny random Hugging Face models and checkpoint writers shared by the safetensors tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 96
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.1
)


def tiny_config(model_type: str):
    if model_type == "qwen2":
        return Qwen2Config(**COMMON, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True)
    if model_type == "qwen3_moe":
        return Qwen3MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=16, num_key_value_heads=2, head_dim=8,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        )  # fmt: skip
    if model_type == "qwen2_moe":
        return Qwen2MoeConfig(
            **COMMON, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
    if model_type == "deepseek_v2":
        return DeepseekV2Config(
            **COMMON, intermediate_size=64, moe_intermediate_size=16, first_k_dense_replace=1,
            num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            topk_method="group_limited_greedy", n_group=2, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        )  # fmt: skip
    if model_type == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=4)
    if model_type == "deepseek_v3":
        return DeepseekV3Config(
            **COMMON, intermediate_size=64, moe_intermediate_size=16, first_k_dense_replace=1,
            num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
            topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        )  # fmt: skip
    raise ValueError(model_type)


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="sdpa")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init: make loading it matter
                buffer.copy_(torch.randn_like(buffer) * 0.1)
    return model.float().eval()


def write_tokenizer(directory: Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", eos_token="t1")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)


def save_hf(model, directory: Path, **kwargs) -> Path:
    """transformers' own writer (one matrix per expert, as checkpoints on the hub) plus a tokenizer."""
    model.save_pretrained(directory, **kwargs)
    write_tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return directory


def save_fused(model, directory: Path) -> Path:
    """The model's own parameter names (fused gate_up_proj/down_proj), written with save_file."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_word_embeddings
    }
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(directory)
    return directory


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (float8_e4m3fn [O, I], scale_inv float32 [ceil(O/bo), ceil(I/bi)]), one scale per block."""
    (o, i), (bo, bi) = w.shape, block
    scale = torch.empty(-(-o // bo), -(-i // bi))
    q = torch.empty(o, i, dtype=torch.float8_e4m3fn)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            tile = w[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0  # 448: the largest float8_e4m3fn
            scale[r, c] = s
            q[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """The plain per-block loop."""
    out = torch.empty(q.shape, dtype=dtype)
    bo, bi = block
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            tile = q[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi].float() * scale[r, c]
            out[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi] = tile.to(dtype)
    return out


def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens by full recomputation (no cache: the same path for both models)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
