"""GGUF `deepseek2` (DeepSeek-V2, V2-Lite, V3, R1, ...) → transformers DeepseekV2/V3ForCausalLM.

One GGUF name holds two Hugging Face families, told apart by the routing:
softmax gating (`expert_gating_func` 1, or absent in older files) is V2
(`greedy` or `group_limited_greedy` top-k); sigmoid gating (2) with the
per-layer `exp_probs_b` bias is V3 (`noaux_tc`).

Attention is MLA. llama.cpp's converter keeps every projection as is (no rope
row permutation: its deepseek2 graph ropes adjacent pairs, as Hugging Face's
interleaved DeepSeek rope does), except `kv_b_proj`, which current converters
split per head into `attn_k_b` [n_head, kv_lora, qk_nope] (transposed, for
absorption) and `attn_v_b` [n_head, v_head, kv_lora]; older files hold
`attn_kv_b` [n_head * (qk_nope + v_head), kv_lora] whole. Either form gives
Hugging Face's `kv_b_proj.weight` (see `derive_dense`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from transformers import DeepseekV2Config, DeepseekV3Config, PretrainedConfig

from tandem.errors import GGUFError, UnsupportedError
from tandem.weights.arch.base import Architecture, Meta, token_ids, vocab_size_of
from tandem.weights.arch.moe import FUSED_EXPERT_TENSORS, ROUTED_EXPERT_TENSORS, check_shapes

KV_B = "self_attn.kv_b_proj.weight"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
SOFTMAX, SIGMOID = 1, 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE


class Deepseek2(Architecture):
    gguf_name = "deepseek2"
    model_type = "deepseek_v3"
    rules_file = "deepseek2.yaml"
    layer_tensors = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_a_proj.weight": "attn_q_a.weight",
        "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
        "self_attn.q_b_proj.weight": "attn_q_b.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
        "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
        KV_B: "attn_kv_b.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        **ROUTED_EXPERT_TENSORS,
        "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
        "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    }
    fused_layer_tensors = FUSED_EXPERT_TENSORS

    def gguf_tensor_parts(
        self, hf_name: str, config: PretrainedConfig, available: Collection[str] | None = None
    ) -> tuple[str, ...] | None:
        match = _LAYER.match(hf_name)
        if match and match.group(2) == KV_B and available is not None:
            p = f"blk.{match.group(1)}."
            if p + "attn_kv_b.weight" not in available and p + "attn_k_b.weight" in available:
                return (p + "attn_k_b.weight", p + "attn_v_b.weight")
        return super().gguf_tensor_parts(hf_name, config, available)

    def derive_dense(
        self, hf_name: str, names: tuple[str, ...], parts: list[torch.Tensor], config: PretrainedConfig
    ) -> torch.Tensor | None:
        if not (hf_name.endswith(KV_B) and len(parts) == 2):
            return None
        k_b, v_b = parts  # [n_head, kv_lora, nope], [n_head, v_head, kv_lora]
        n, lora, nope = config.num_attention_heads, config.kv_lora_rank, config.qk_nope_head_dim
        expected = {names[0]: (n, lora, nope), names[1]: (n, config.v_head_dim, lora)}
        for name, part in zip(names, parts, strict=True):
            if tuple(part.shape) != expected[name]:
                raise GGUFError(
                    f"tensor {name!r} has shape {list(part.shape)}, but the metadata (head_count = {n}, "
                    f"kv_lora_rank = {lora}, key/value_length_mla) gives {list(expected[name])}"
                )
        kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # [n_head, nope + v_head, kv_lora]
        return kv_b.reshape(-1, lora)

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        m = Meta(meta, self.gguf_name)
        kwargs = _config_kwargs(m, meta, tensor_shapes)
        has_bias = any(name.endswith(".exp_probs_b.bias") for name in tensor_shapes)
        # 0 (none) or no key: files from before the key existed; llama.cpp then assumes
        # softmax, and only V3 files carry the routing bias.
        gating = m.int("expert_gating_func", 0, minimum=0, maximum=3) or (SIGMOID if has_bias else SOFTMAX)
        kwargs["topk_group"] = m.int("expert_group_used_count", 1, maximum=kwargs["n_group"])
        _check_shapes(tensor_shapes, kwargs)
        if gating == SIGMOID:
            if not has_bias:
                raise UnsupportedError(
                    "deepseek2.expert_gating_func = 2 (sigmoid) but the file has no exp_probs_b tensors; "
                    "only DeepSeek-V3's biased sigmoid routing is supported"
                )
            return DeepseekV3Config(**kwargs, rope_interleave=True)
        if gating != SOFTMAX:
            raise UnsupportedError(f"deepseek2.expert_gating_func = {gating} is not supported")
        if has_bias:
            raise UnsupportedError(
                "softmax gating with exp_probs_b tensors is not a DeepSeek model tandem knows"
            )
        if kwargs.pop("norm_topk_prob"):
            raise UnsupportedError(
                "deepseek2.expert_weights_norm = true with softmax gating is not supported"
            )
        method = "group_limited_greedy" if kwargs["n_group"] > 1 else "greedy"
        return DeepseekV2Config(**kwargs, topk_method=method)


def _config_kwargs(m: Meta, meta: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict:
    vocab = vocab_size_of(shapes)
    layers = m.int("block_count", maximum=4096)
    heads = m.int("attention.head_count")
    kv_lora = m.int("attention.kv_lora_rank")
    rope = m.int("rope.dimension_count")
    # key/value_length_mla are the per-head sizes; older files only have key/value_length,
    # which then are the per-head sizes themselves (newer files give the MQA latent form there).
    qk_head = (
        m.int("attention.key_length_mla")
        if m.has("attention.key_length_mla")
        else m.int("attention.key_length")
    )
    v_head = (
        m.int("attention.value_length_mla")
        if m.has("attention.value_length_mla")
        else m.int("attention.value_length")
    )
    if qk_head <= rope:
        raise GGUFError(f"deepseek2 key length {qk_head} must exceed rope.dimension_count = {rope}")
    q_lora = m.int("attention.q_lora_rank", 0, minimum=0)
    experts = m.int("expert_count", maximum=1 << 16)
    ids = token_ids(meta, vocab)
    return {
        "vocab_size": vocab,
        "hidden_size": m.int("embedding_length"),
        "intermediate_size": m.int("feed_forward_length"),
        "moe_intermediate_size": m.int("expert_feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": kv_lora,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": qk_head - rope,
        "v_head_dim": v_head,
        "first_k_dense_replace": m.int("leading_dense_block_count", 0, minimum=0, maximum=layers),
        "n_routed_experts": experts,
        "num_experts_per_tok": m.int("expert_used_count", maximum=experts),
        "n_shared_experts": m.int("expert_shared_count", 0, minimum=0),
        "n_group": m.int("expert_group_count", 1, maximum=experts),
        "routed_scaling_factor": m.float("expert_weights_scale", 1.0) or 1.0,
        "norm_topk_prob": _flag(meta, "deepseek2.expert_weights_norm"),
        "rms_norm_eps": m.float("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": m.int("context_length", 4096, maximum=1 << 30),
        "rope_parameters": _rope(m),
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
    }


def _flag(meta: Mapping[str, Any], key: str) -> bool:
    value = meta.get(key, False)
    if not isinstance(value, bool):
        raise GGUFError(f"metadata key {key!r} should be a boolean, got {type(value).__name__}")
    return value


def _rope(m: Meta) -> dict[str, Any]:
    theta = m.float("rope.freq_base", 10000.0)
    kind = m.str("rope.scaling.type")
    if kind in (None, "none"):
        return {"rope_type": "default", "rope_theta": theta}
    if kind != "yarn":
        raise UnsupportedError(f"deepseek2 rope scaling type {kind!r} is not supported")
    # The converter writes 0.1 * mscale_all_dim as yarn_log_multiplier (llama.cpp divides it
    # back). The files keep no separate `mscale`: DeepSeek's configs set both to the same value.
    mscale = m.float("rope.scaling.yarn_log_multiplier", 0.0) / 0.1
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": m.float("rope.scaling.factor"),
        "original_max_position_embeddings": m.int("rope.scaling.original_context_length"),
        "mscale": mscale,
        "mscale_all_dim": mscale,
        "beta_fast": m.float("rope.scaling.yarn_beta_fast", 32.0),
        "beta_slow": m.float("rope.scaling.yarn_beta_slow", 1.0),
    }


def _check_shapes(shapes: Mapping[str, tuple[int, ...]], k: Mapping[str, Any]) -> None:
    """Every layer's tensors must have the shapes the metadata gives; the message names both."""
    h, n, lora, rope = k["hidden_size"], k["num_attention_heads"], k["kv_lora_rank"], k["qk_rope_head_dim"]
    qk, v, q_lora = k["qk_nope_head_dim"] + rope, k["v_head_dim"], k["q_lora_rank"]
    e, i, s = k["n_routed_experts"], k["moe_intermediate_size"], k["n_shared_experts"]
    says = (
        f"metadata deepseek2 (embedding_length = {h}, head_count = {n}, q_lora_rank = {q_lora or 0}, "
        f"kv_lora_rank = {lora}, rope.dimension_count = {rope}, key_length_mla = {qk}, "
        f"value_length_mla = {v}, expert_count = {e}, expert_feed_forward_length = {i}, "
        f"expert_shared_count = {s}, feed_forward_length = {k['intermediate_size']}) gives"
    )
    for layer in range(k["num_hidden_layers"]):
        p = f"blk.{layer}."
        expected: dict[str, tuple[int, ...]] = {
            "attn_kv_a_mqa.weight": (lora + rope, h),
            "attn_kv_a_norm.weight": (lora,),
            "attn_output.weight": (h, n * v),
        }
        if q_lora:
            expected |= {"attn_q_a.weight": (q_lora, h), "attn_q_b.weight": (n * qk, q_lora)}
        elif p + "attn_q_a.weight" in shapes:
            raise GGUFError(
                f"tensor {p}attn_q_a.weight exists, but metadata deepseek2.q_lora_rank is 0 or absent"
            )
        else:
            expected["attn_q.weight"] = (n * qk, h)
        if p + "attn_kv_b.weight" in shapes:
            expected["attn_kv_b.weight"] = (n * (qk - rope + v), lora)
        else:
            expected |= {"attn_k_b.weight": (n, lora, qk - rope), "attn_v_b.weight": (n, v, lora)}
        if layer < k["first_k_dense_replace"]:
            f = k["intermediate_size"]
            expected |= {"ffn_gate.weight": (f, h), "ffn_up.weight": (f, h), "ffn_down.weight": (h, f)}
        else:
            expected |= {
                "ffn_gate_inp.weight": (e, h),
                "ffn_gate_exps.weight": (e, i, h),
                "ffn_up_exps.weight": (e, i, h),
                "ffn_down_exps.weight": (e, h, i),
            }
            if s:
                expected |= {
                    "ffn_gate_shexp.weight": (i * s, h),
                    "ffn_up_shexp.weight": (i * s, h),
                    "ffn_down_shexp.weight": (h, i * s),
                }
        check_shapes(shapes, p, expected, says)
