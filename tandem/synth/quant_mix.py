"""Which ggml type each tensor gets: llama.cpp's quantizer recipes (llama-quantize).

A transcription of `llama_tensor_get_type` / `llama_tensor_get_type_impl` /
`tensor_type_fallback` in llama.cpp's src/llama-quant.cpp (the commit that
llama-cpp-python 0.3.36 vendors), restricted to the branches the mixes below
reach with no imatrix and no overrides:

- output.weight: Q6_K (Q8_0 when its rows are not a multiple of 256; Q8_0
  stays Q8_0). token_embd.weight keeps the default type (it is untied here).
- attn_v / attn_qkv / attn_kv_b ("attn_v-like"): Q6_K for Q4_K_M and Q5_K_M
  where use_more_bits(i, n) holds, i counting those tensors in layer order;
  Q8_0 in any mix when the model has exactly 8 experts (Mixtral).
  DeepSeek's split attn_k_b / attn_v_b are not attn_v-like: default type.
- attn_k: Q8_0 with exactly 8 experts.
- attn_output: Q5_K for Q4_K_M with exactly 8 experts.
- every ffn_down* (dense, experts, shared): Q6_K for Q4_K_M and Q5_K_M where
  use_more_bits(layer, n_layer) holds.
- norms, 1-D tensors and ffn_gate_inp are never quantized (they stay F32).
- fallback when a row is not a multiple of the type's block: Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0 (-> F16 if even 32 does not divide the row).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from tandem.errors import UnsupportedError
from tandem.synth.shapes import ShapeSpec
from tandem.synth.tensors import TensorSpec

T = GGMLQuantizationType


@dataclass(frozen=True)
class Mix:
    name: str
    file_type: LlamaFileType
    default: GGMLQuantizationType


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        Mix("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
        Mix("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
        Mix("Q6_K", LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
        Mix("Q8_0", LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    )
}

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def get_mix(name: str) -> Mix:
    mix = MIXES.get(name.upper())
    if mix is None:
        raise UnsupportedError(f"unknown quantization mix {name!r}; known: {', '.join(MIXES)}")
    return mix


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def assign_types(
    spec: ShapeSpec, table: list[TensorSpec], mix: str | Mix = "Q4_K_M"
) -> dict[str, GGMLQuantizationType]:
    """The ggml type of every tensor of `table` (a tensor_table of `spec`) under `mix`."""
    mix = get_mix(mix) if isinstance(mix, str) else mix
    # n_layer is the block count written to the file (hparams.n_layer_all), and
    # the attn_v-like counter runs over tensors sorted by layer, as llama.cpp's
    # weights_map is.
    n_layer = 1 + max((_layer_of(t.name) for t in table), default=-1)
    attn_v = [t.name for t in table if _is_attn_v_like(t.name)]
    attn_v.sort(key=lambda name: (_layer_of(name), name))
    attn_v_index = {name: i for i, name in enumerate(attn_v)}
    types = {}
    for t in table:
        if t.kind != "weight":
            types[t.name] = T.F32
            continue
        wanted = _impl(spec, t, mix, n_layer, attn_v_index.get(t.name, -1), len(attn_v))
        types[t.name] = _fallback(t, wanted)
    return types


def _impl(spec: ShapeSpec, t: TensorSpec, mix: Mix, n_layer: int, i_attn_v: int, n_attn_v: int) -> T:
    name, new = t.name, mix.default
    k_m = mix.name in ("Q4_K_M", "Q5_K_M")
    eight_experts = spec.n_expert == 8
    if name == "output.weight":
        if t.row % GGML_QUANT_SIZES[new][0]:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if name == "token_embd.weight":
        return new
    if _is_attn_v_like(name):
        if k_m and use_more_bits(i_attn_v, n_attn_v):
            new = T.Q6_K
        return T.Q8_0 if eight_experts else new
    if name.endswith("attn_k.weight"):
        return T.Q8_0 if eight_experts else new
    if "ffn_down" in name:
        if k_m and use_more_bits(_layer_of(name), n_layer):
            return T.Q6_K
        return new
    if name.endswith("attn_output.weight") and eight_experts and mix.name == "Q4_K_M":
        return T.Q5_K
    return new


def _fallback(t: TensorSpec, wanted: T) -> T:
    if t.row % GGML_QUANT_SIZES[wanted][0] == 0:
        return wanted
    if wanted in _FALLBACK:
        demoted = _FALLBACK[wanted]
    elif GGML_QUANT_SIZES[wanted][0] <= 32:
        demoted = wanted
    else:
        raise UnsupportedError(f"{t.name}: no fallback for {wanted.name} with rows of {t.row}")
    return demoted if t.row % GGML_QUANT_SIZES[demoted][0] == 0 else T.F16


def _is_attn_v_like(name: str) -> bool:
    return any(s in name for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def _layer_of(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def tensor_bytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * size
