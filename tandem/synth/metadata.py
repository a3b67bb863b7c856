"""GGUF metadata of a synthetic model: the keys llama.cpp's converter writes for the
architecture, and a tokenizer copied from the embedded Qwen2.5 model.

Keys follow convert_hf_to_gguf.py (conversion/base.py TextModel, qwen.py
Qwen2MoeModel, llama.py LlamaModel, deepseek.py DeepseekV2Model) for the same
config.json values; each GGUFWriter.add_* call writes the key name and value
type gguf-py defines, which are the ones llama.cpp reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import ExpertGatingFuncType, GGUFWriter, RopeScalingType, TokenType

from tandem.synth.shapes import ShapeSpec


def add_model_metadata(w: GGUFWriter, spec: ShapeSpec, n_layer: int) -> None:
    """The architecture's hyperparameters, for a file holding `n_layer` layers."""
    w.add_block_count(n_layer)
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_expert_count(spec.n_expert)
    w.add_expert_used_count(spec.n_expert_used)
    if spec.arch == "qwen3moe":
        # config.json has head_dim, which the base converter writes as key/value length
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        w.add_expert_feed_forward_length(spec.expert_ffn)
    elif spec.arch == "llama":
        w.add_vocab_size(spec.vocab)
        w.add_rope_dimension_count(spec.head_dim)
    else:
        _add_deepseek2(w, spec, n_layer)


def _add_deepseek2(w: GGUFWriter, spec: ShapeSpec, n_layer: int) -> None:
    m = spec.mla
    assert m is not None  # checked by ShapeSpec
    if spec.n_group:
        w.add_expert_group_count(spec.n_group)
        w.add_expert_group_used_count(spec.topk_group)
    w.add_expert_gating_func(
        ExpertGatingFuncType.SIGMOID if spec.gating == "sigmoid" else ExpertGatingFuncType.SOFTMAX
    )
    w.add_leading_dense_block_count(min(spec.leading_dense, n_layer))
    w.add_vocab_size(spec.vocab)
    if m.q_lora_rank:
        w.add_q_lora_rank(m.q_lora_rank)
    elif n_layer not in (26, 27):
        # llama.cpp (src/models/deepseek2.cpp) recognizes a model without query
        # LoRA only by its layer count (26 or 27) and otherwise requires this key;
        # 0 makes it load attn_q instead of attn_q_a/attn_q_b. Real V2-Lite files
        # (27 layers) do not have it.
        w.add_q_lora_rank(0)
    # MLA is stored as MQA with one wide KV head: key = latent + rope part.
    w.add_kv_lora_rank(m.kv_lora_rank)
    w.add_key_length(m.kv_lora_rank + m.qk_rope_head_dim)
    w.add_value_length(m.kv_lora_rank)
    w.add_key_length_mla(m.qk_nope_head_dim + m.qk_rope_head_dim)
    w.add_value_length_mla(m.v_head_dim)
    w.add_expert_feed_forward_length(spec.expert_ffn)
    w.add_expert_shared_count(spec.n_shared_expert)
    if spec.expert_weights_scale:
        w.add_expert_weights_scale(spec.expert_weights_scale)
    if spec.expert_weights_norm:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(m.qk_rope_head_dim)
    if spec.yarn is not None:
        y = spec.yarn
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_context)
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
        # The converter writes 0.1 * mscale_all_dim and llama.cpp divides by 0.1 again.
        w.add_rope_scaling_yarn_log_mul(0.1 * y.mscale_all_dim)


def add_tokenizer(w: GGUFWriter, vocab: int, source: dict[str, Any]) -> None:
    """A byte-level BPE tokenizer of exactly `vocab` tokens, from `source` (the
    metadata of a GGUF with a "gpt2" tokenizer, the embedded Qwen2.5 model).

    - vocab == the source's token count: copied as is, with its chat template.
    - vocab larger: padded with "[PAD{i}]" tokens of type UNUSED, as the
      converter pads a vocabulary shorter than config.json's vocab_size.
    - vocab smaller: the first vocab-1 tokens (the 256 byte tokens, then
      merged tokens in merge order) and only the merges whose parts and result
      all stay, then one control token "<|endoftext|>" as BOS, EOS and padding.
      A real byte-level BPE, so any text tokenizes; ids do not mean what they
      mean in the real model (these files have random weights anyway). The
      chat template is left out: its special tokens are gone.
    """
    tokens: list[str] = list(source["tokenizer.ggml.tokens"])
    types: list[int] = list(source["tokenizer.ggml.token_type"])
    merges: list[str] = list(source["tokenizer.ggml.merges"])
    w.add_tokenizer_model(source["tokenizer.ggml.model"])
    w.add_tokenizer_pre(source.get("tokenizer.ggml.pre", "default"))
    if vocab >= len(tokens):
        for i in range(len(tokens), vocab):
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for key, add in (
            ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
            ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
            ("tokenizer.ggml.padding_token_id", w.add_pad_token_id),
        ):
            if key in source:
                add(source[key])
        if "tokenizer.ggml.add_bos_token" in source:
            w.add_add_bos_token(source["tokenizer.ggml.add_bos_token"])
        if "tokenizer.chat_template" in source:
            w.add_chat_template(source["tokenizer.chat_template"])
        return
    if vocab < 512:
        raise ValueError(f"a generated vocabulary needs at least 512 tokens, got {vocab}")
    kept = tokens[: vocab - 1]
    kept_types = [int(TokenType.NORMAL)] * len(kept)
    present = set(kept)
    kept_merges = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        if left in present and right in present and left + right in present:
            kept_merges.append(merge)
    eot = vocab - 1
    w.add_token_list([*kept, "<|endoftext|>"])
    w.add_token_types([*kept_types, int(TokenType.CONTROL)])
    w.add_token_merges(kept_merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_pad_token_id(eot)
    w.add_add_bos_token(False)


def default_tokenizer_source() -> dict[str, Any]:
    """The metadata of the embedded Qwen2.5 model (151,936 tokens, byte-level BPE)."""
    from tandem.weights.default_model import default_model_path
    from tandem.weights.gguf_file import read_metadata

    return read_metadata(Path(default_model_path()))
