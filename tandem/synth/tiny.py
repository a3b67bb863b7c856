"""Tiny random-weight Hugging Face models written to GGUF the way llama.cpp's converter writes them.

The inverse of tandem's architecture maps: tandem must load these back into the same
logits. Only what the loader needs is written, plus, on request, a small byte-level
tokenizer (`tokenizer.ggml.*`) so the CLI can run them.

MoE families (`qwen2moe`, `qwen3moe`, `mixtral`: 8 experts, top 2) are written as
llama.cpp writes them: each layer's experts stacked into `ffn_{gate,up,down}_exps`,
Mixtral under the GGUF name `llama`. `deepseek2` is DeepSeek-V3 by default (the
layout of V3 and R1), `variant="v2"` DeepSeek-V2; see tiny_deepseek.py.

Quantized files keep 1-D tensors, the router and every tensor whose rows are not a
whole number of blocks in float, as llama-quantize does.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from tandem.synth.tiny_deepseek import add_deepseek_metadata, deepseek_config, split_kv_b
from tandem.weights.arch import get_architecture

_COMMON = dict(
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
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
MOE_ARCHS = ("qwen2moe", "qwen3moe", "mixtral")
TINY_ARCHS = ("llama", "qwen2", "gemma3", *MOE_ARCHS, "deepseek2")
GGUF_ARCH = {"mixtral": "llama"}  # llama.cpp writes Mixtral as `llama`


def tiny_config(arch: str, tie: bool = False, vocab_size: int = 64, **options):
    """A tiny config of `arch`; `options` go to deepseek_config for deepseek2."""
    if arch == "deepseek2":
        return deepseek_config(**options, vocab_size=vocab_size)
    COMMON = {**_COMMON, "vocab_size": vocab_size}
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
    if arch == "qwen2moe":
        return Qwen2MoeConfig(
            **COMMON,
            **MOE,
            num_experts=8,
            shared_expert_intermediate_size=64,
            rope_theta=10000.0,
            tie_word_embeddings=tie,
            norm_topk_prob=False,
            qkv_bias=True,
        )
    if arch == "qwen3moe":
        # head_dim * heads != hidden: the key_length metadata matters.
        return Qwen3MoeConfig(
            **COMMON,
            **MOE,
            num_experts=8,
            head_dim=32,
            rope_theta=10000.0,
            tie_word_embeddings=tie,
            norm_topk_prob=True,
        )
    if arch == "mixtral":
        config = {**COMMON, "intermediate_size": 32}  # Mixtral's expert width
        return MixtralConfig(
            **config,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            rope_theta=10000.0,
            tie_word_embeddings=tie,
        )
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, tie: bool = False, vocab_size: int = 64, **options):
    torch.manual_seed(seed)
    config = tiny_config(arch, tie, vocab_size, **options)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, not their zero/one init
            if arch != "deepseek2":
                p.normal_(0, 0.3 if p.dim() == 1 else 0.08)
            elif p.dim() >= 2:  # unit-variance outputs: MLA's chain of norms and low-rank projections
                p.normal_(0, p.shape[-1] ** -0.5)  # otherwise ends in near-constant logits
            else:
                p.normal_(1, 0.2)
        for name, b in model.named_buffers():  # DeepSeek-V3's routing bias is a buffer
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
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
    tokenizer: bool = False,
    split_kv: bool = True,
) -> Path:
    """Write `model` as llama.cpp would; with split_max_tensors, as a split set `path-0000N-of-0000M.gguf`.

    split_kv (deepseek2): DeepSeek's kv_b_proj as attn_k_b + attn_v_b (current converters)
    or as one attn_kv_b (older ones).
    """
    config = model.config
    gguf_arch = GGUF_ARCH.get(arch, arch)
    spec = get_architecture(gguf_arch, ["blk.0.ffn_gate_exps.weight"] if arch == "mixtral" else ())
    writer = gguf.GGUFWriter(str(path), gguf_arch, split_max_tensors=split_max_tensors)
    if arch == "deepseek2":
        add_deepseek_metadata(writer, config, split_kv)
    else:
        _add_common_metadata(writer, config, arch)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if tokenizer:
        _add_byte_tokenizer(writer, config.vocab_size)
    written = set()
    for name, param in model.state_dict().items():
        targets = spec.gguf_tensor_parts(name, config)
        if targets is None or targets[0] in written:
            continue
        written.update(targets)
        w = param.detach().float().numpy().copy()
        if gguf_arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute(w, config.num_attention_heads)
        if gguf_arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute(w, config.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1
        if name.endswith("shared_expert_gate.weight"):
            w = w.reshape(-1)  # the converter squeezes [1, H] to [H]
        if name.endswith("kv_b_proj.weight") and split_kv:
            prefix = targets[0].removesuffix("attn_kv_b.weight")
            targets, parts = (prefix + "attn_k_b.weight", prefix + "attn_v_b.weight"), split_kv_b(w, config)
        else:
            # gate_up_proj [E, 2I, H] → ffn_gate_exps, ffn_up_exps [E, I, H] each
            parts = np.split(w, len(targets), axis=-2) if len(targets) > 1 else [w]
        for target, part in zip(targets, parts, strict=True):
            _add_tensor(writer, target, np.ascontiguousarray(part), quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, quant) -> None:
    # llama-quantize leaves 1-D tensors and the router (ffn_gate_inp) in float, and so do
    # tensors whose rows are not whole blocks (llama.cpp would pick another type; float is one).
    block = gguf.GGML_QUANT_SIZES[quant][0]
    if (
        values.ndim < 2
        or quant == gguf.GGMLQuantizationType.F32
        or "ffn_gate_inp" in name
        or values.shape[-1] % block
    ):
        writer.add_tensor(name, values)
    else:
        writer.add_tensor(name, gguf.quants.quantize(values, quant), raw_dtype=quant)


def _add_common_metadata(writer: gguf.GGUFWriter, config, arch: str) -> None:
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
    if arch in MOE_ARCHS:
        _add_expert_metadata(writer, config, arch)


def _add_expert_metadata(writer: gguf.GGUFWriter, config, arch: str) -> None:
    writer.add_expert_count(config.num_experts if arch != "mixtral" else config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if arch != "mixtral":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _add_byte_tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """A gpt2-style vocabulary: <pad>, <s>, </s>, byte-level characters, two merges, then
    unused padding tokens up to vocab_size (from 261 tokens on, every byte has a token)."""
    from tokenizers import pre_tokenizers

    merges = ["A B", "C D"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<pad>", "<s>", "</s>", *alphabet[: vocab_size - 3 - len(merges)]]
    tokens += [m.replace(" ", "") for m in merges]
    pads = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types = [3, 3, 3] + [1] * (len(tokens) - 3) + [5] * len(pads)  # control, normal, unused
    tokens += pads
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


TINY_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
TINY_VOCAB = 512  # every byte has a token, so any prompt tokenizes


def write_tiny(arch: str, path: str | Path, quant: str = "F32", seed: int = 0, variant: str = "v3") -> Path:
    """A tiny random `arch` model with a byte-level tokenizer, ready for `tandem generate`/`chat`.

    variant: for deepseek2, "v3" (DeepSeek-V3/R1 routing, the default) or "v2".
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    if quant not in TINY_QUANTS:
        raise ValueError(f"quant must be one of {', '.join(TINY_QUANTS)}, got {quant!r}")
    options = {"variant": variant} if arch == "deepseek2" else {}
    model = tiny_model(arch, seed, vocab_size=TINY_VOCAB, **options)
    return write_gguf(model, arch, Path(path), gguf.GGMLQuantizationType[quant], tokenizer=True)
