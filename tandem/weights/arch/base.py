"""The contract every architecture file fulfils.

An architecture turns GGUF metadata into a Hugging Face config, names the GGUF
tensor behind each Hugging Face parameter, and fixes up tensors whose GGUF form
differs from the Hugging Face one (row permutations, norm offsets). Adding a
family means adding one file with one subclass and registering it.

Fused parameters: transformers 5.x stores a layer's routed experts as 3-D tensors
and fuses the gate and up projections (`mlp.experts.gate_up_proj` [E, 2I, H]),
while llama.cpp keeps `ffn_gate_exps` and `ffn_up_exps` ([E, I, H] each) apart.
`fused_layer_tensors` names the GGUF parts of such a parameter; the parameter is
their concatenation along dim -2, in the order listed. Operators that want the
parts raw get them from `GGUFWeights.quant_parts`; the plain load path
concatenates their dequantized values.

Derived parameters: a few parameters are stored in another form (DeepSeek's
`kv_b_proj` split per head into `attn_k_b` and `attn_v_b`). `gguf_tensor_parts`
may then name other tensors when it is told which ones the file has
(`available`), and `derive_dense` builds the parameter from their values.

Several families can share one `general.architecture` (GGUF `llama` is dense
Llama or Mixtral): `claims(tensor_names)` lets a class take a file by its
tensors; the registry asks the more specific class first.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from transformers import PretrainedConfig

from tandem.errors import GGUFError, UnsupportedError
from tandem.quant.quant_tensor import QuantTensor

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class Architecture:
    """Base class: subclasses set the tables and implement `hf_config`."""

    gguf_name: str = ""  # general.architecture in the GGUF file
    model_type: str = ""  # Hugging Face model_type
    rules_file: str = ""  # default rule file in tandem/rules/
    # Hugging Face parameter names → GGUF tensor names.
    global_tensors: Mapping[str, str] = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    # Inside `model.layers.{i}.` → inside `blk.{i}.`
    layer_tensors: Mapping[str, str] = {}
    # Inside `model.layers.{i}.` → GGUF tensors inside `blk.{i}.`, concatenated along dim -2.
    fused_layer_tensors: Mapping[str, tuple[str, ...]] = {}

    @classmethod
    def claims(cls, tensor_names: Collection[str]) -> bool:
        """Whether this class reads a file of its gguf_name with these tensors. Default: any."""
        return True

    def hf_config(
        self, meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
    ) -> PretrainedConfig:
        raise NotImplementedError

    def gguf_tensor_name(self, hf_name: str, config: PretrainedConfig) -> str | None:
        """The GGUF tensor holding a Hugging Face parameter, or None if the family has no such tensor."""
        if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            return "token_embd.weight"
        if hf_name in self.global_tensors:
            return self.global_tensors[hf_name]
        match = _LAYER.match(hf_name)
        if match and match.group(2) in self.layer_tensors:
            return f"blk.{match.group(1)}.{self.layer_tensors[match.group(2)]}"
        return None

    def gguf_tensor_parts(
        self, hf_name: str, config: PretrainedConfig, available: Collection[str] | None = None
    ) -> tuple[str, ...] | None:
        """The GGUF tensors of a parameter: one name, or the parts of a fused or derived parameter
        in order. `available` (the file's tensor names) lets a family pick among stored forms."""
        match = _LAYER.match(hf_name)
        if match and match.group(2) in self.fused_layer_tensors:
            return tuple(f"blk.{match.group(1)}.{part}" for part in self.fused_layer_tensors[match.group(2)])
        name = self.gguf_tensor_name(hf_name, config)
        return None if name is None else (name,)

    def derive_dense(
        self, hf_name: str, names: tuple[str, ...], parts: list[torch.Tensor], config: PretrainedConfig
    ) -> torch.Tensor | None:
        """The values of a derived parameter from its parts' dequantized values, or None for
        the usual one part or concatenation along dim -2. Default: None."""
        return None

    def fix_quant(self, hf_name: str, tensor: QuantTensor, config: PretrainedConfig) -> QuantTensor:
        """Undo GGUF-specific layouts on raw blocks (e.g. row permutations). Default: none.

        For a fused parameter it is called on each part with the parameter's name.
        """
        return tensor

    def fix_dense(self, hf_name: str, tensor: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
        """Undo GGUF-specific value changes on dequantized values (e.g. Gemma's norm +1). Default: none."""
        return tensor


class Meta:
    """Typed access to `{arch}.*` metadata keys with clear errors for missing or mistyped values."""

    def __init__(self, meta: Mapping[str, Any], arch: str):
        self._meta = meta
        self._arch = arch

    def has(self, key: str) -> bool:
        return f"{self._arch}.{key}" in self._meta

    def int(self, key: str, default: int | None = None, *, minimum: int = 1, maximum: int = 1 << 24) -> int:
        full = f"{self._arch}.{key}"
        value = self._meta.get(full, default)
        if value is None:
            raise GGUFError(f"metadata key {full!r} is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFError(f"metadata key {full!r} should be an integer, got {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise GGUFError(f"metadata key {full!r} = {value} is outside [{minimum}, {maximum}]")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        full = f"{self._arch}.{key}"
        value = self._meta.get(full, default)
        if value is None:
            raise GGUFError(f"metadata key {full!r} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFError(f"metadata key {full!r} should be a number, got {type(value).__name__}")
        if value != value or value in (float("inf"), float("-inf")):
            raise GGUFError(f"metadata key {full!r} is not finite")
        return float(value)

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self._meta.get(f"{self._arch}.{key}", default)
        if value is not None and not isinstance(value, str):
            raise GGUFError(f"metadata key '{self._arch}.{key}' should be a string")
        return value


def token_ids(meta: Mapping[str, Any], vocab_size: int) -> dict[str, int | None]:
    """bos/eos/pad ids from the tokenizer metadata, ignoring ids outside the vocabulary."""
    ids: dict[str, int | None] = {}
    for name in ("bos", "eos", "padding"):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size
        ids[name] = value if valid else None
    return ids


def vocab_size_of(tensor_shapes: Mapping[str, tuple[int, ...]]) -> int:
    shape = tensor_shapes.get("token_embd.weight")
    if shape is None or len(shape) != 2:
        raise GGUFError("tensor 'token_embd.weight' is missing or not 2-D")
    return shape[0]


def rope_scaling(m: Meta) -> dict[str, Any] | None:
    """Hugging Face rope_scaling from GGUF `rope.scaling.*` keys (none, linear, yarn)."""
    kind = m.str("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = m.float("rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = m.int("rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise UnsupportedError(f"rope scaling type {kind!r} is not supported")


def require_dense_ffn(tensor_shapes: Mapping[str, tuple[int, ...]], arch: str) -> None:
    """The dense families must not carry expert tensors (those are MoE variants, loaded by other files)."""
    if any(".ffn_gate_exps." in name or ".ffn_up_exps." in name for name in tensor_shapes):
        raise UnsupportedError(f"this {arch} file has routed experts (MoE); its family is not supported yet")
