"""Weights by Hugging Face parameter name from a Hugging Face directory: GGUFWeights' interface.

BF16/F16/F32 tensors are served as QuantTensors of ggml type BF16/F16/F32 that view
the mapped file, so every operator works unchanged. FP8 tensors (DeepSeek-V3) are
dequantized at load (see safetensors_fp8).

Experts. transformers 5.x modules hold fused `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I]; checkpoints on the hub hold one matrix per expert
(`experts.{e}.gate_proj.weight`, or Mixtral's `block_sparse_moe.experts.{e}.w1.weight`
with w1 = gate, w3 = up, w2 = down), which transformers fuses at load
(conversion_mapping.py). Both are served: QuantExperts wants gate, up and down each as
one [E, ·, ·] QuantTensor, so per-expert matrices are stacked into new memory once at
load, and a fused gate_up is split into two copies. Either way the routed experts cost
their full size in RAM (anonymous memory, not the page cache), on top of the mapping's
pages that stay cached until the kernel needs them back; a fused `down_proj` stays a view.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from transformers import PretrainedConfig

from tandem.errors import UnsupportedError, WeightError
from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.safetensors_file import SafetensorsFile
from tandem.weights.safetensors_fp8 import SCALE_SUFFIX, dequantize_fp8_blocks, fp8_block_size
from tandem.weights.source import check_parts, join_parts

GGML_TYPES = {
    "F32": GGMLQuantizationType.F32,
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
}
SERVED_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}
# per-expert file names of (gate, up, down): transformers' layout, then Mixtral's original one
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
_FUSED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<which>gate_up_proj|down_proj)$")


class HFLayout:
    """A checkpoint in Hugging Face layout needs none of the value fixes GGUF architectures apply."""

    gguf_name = "safetensors"

    def fix_dense(self, hf_name: str, values: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
        return values

    def fix_quant(self, hf_name: str, tensor: QuantTensor, config: PretrainedConfig) -> QuantTensor:
        return tensor


class SafetensorsWeights:
    """What operators load from, reading a Hugging Face model directory.

    fp8_dtype: the dtype FP8 weights are dequantized to (torch.bfloat16 or torch.float32).
    """

    def __init__(
        self, file: SafetensorsFile, config: PretrainedConfig, fp8_dtype: torch.dtype = torch.bfloat16
    ):
        if fp8_dtype not in SERVED_DTYPES:
            raise UnsupportedError(f"FP8 weights dequantize to bfloat16 or float32, not {fp8_dtype}")
        self.file = file
        self.config = config
        self.arch = HFLayout()
        self.fp8_block = fp8_block_size(config)
        self.fp8_dtype = fp8_dtype
        self.used: set[str] = set()  # file tensor names something loaded

    def has(self, hf_name: str) -> bool:
        try:
            return self._resolve(hf_name) is not None
        except WeightError:
            return False

    def quant(self, hf_name: str, shape: tuple[int, ...] | None = None) -> QuantTensor:
        """The values of a parameter as one QuantTensor (ggml BF16/F16/F32); `shape` is checked when given."""
        parts = self.quant_parts(hf_name, shape)
        if len(parts) != 1:
            raise WeightError(
                f"parameter {hf_name!r} is fused from {len(parts)} parts: load it with quant_parts or dense"
            )
        return parts[0]

    def quant_parts(self, hf_name: str, shape: tuple[int, ...] | None = None) -> list[QuantTensor]:
        """Each part of a parameter (gate and up for a fused `gate_up_proj`, else one), in order."""
        found = self._resolve(hf_name)
        if found is None:
            raise WeightError(f"parameter {hf_name!r} has no tensor in {self.file.directory.name}")
        parts = found()
        if shape is not None:
            check_parts(hf_name, parts, tuple(shape))
        return parts

    def dense(
        self,
        hf_name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        parts = [part.dequantize(torch.float32) for part in self.quant_parts(hf_name, shape)]
        return join_parts(parts).to(device=device, dtype=dtype)

    def _resolve(self, hf_name: str):
        """A function returning the parameter's parts, or None when the file lacks it."""
        for name in _file_names(hf_name, self.config):
            if name in self.file.tensors:
                if hf_name.endswith(".experts.gate_up_proj"):
                    return lambda: _split_gate_up(self._tensor(name))
                return lambda: [self._tensor(name)]
        m = _FUSED.match(hf_name)
        if m is None:
            return None
        for prefix in _file_names(m["prefix"], self.config):
            for gate, up, down in EXPERT_NAMES:
                names = (gate, up) if m["which"] == "gate_up_proj" else (down,)
                if f"{prefix}.0.{names[0]}.weight" in self.file.tensors:
                    return lambda p=prefix, ns=names: [self._stack(hf_name, p, n) for n in ns]
        return None

    def _stack(self, hf_name: str, prefix: str, name: str) -> QuantTensor:
        """Per-expert matrices `{prefix}.{e}.{name}.weight` stacked into one new [E, R, C] tensor."""
        n_experts = _n_experts(self.config)
        names = [f"{prefix}.{e}.{name}.weight" for e in range(n_experts)]
        missing = [n for n in names if n not in self.file.tensors]
        if missing:
            raise WeightError(
                f"tensor {missing[0]!r} (for parameter {hf_name!r}) is missing from {self.file.directory.name}"
            )
        first = self._values(names[0])
        out = torch.empty((n_experts, *first.shape), dtype=first.dtype)  # [E, R, C]
        for e, n in enumerate(names):
            values = first if e == 0 else self._values(n)
            if values.shape != first.shape or values.dtype != first.dtype:
                raise WeightError(
                    f"tensor {n!r} is {values.dtype} {list(values.shape)}, unlike {names[0]!r} "
                    f"({first.dtype} {list(first.shape)})"
                )
            out[e] = values
        return _as_quant(out, f"{prefix}.*.{name}.weight")

    def _tensor(self, name: str) -> QuantTensor:
        """One file tensor as a QuantTensor: a view of the mapping, or dequantized FP8."""
        entry = self.file.tensors[name]
        if entry.dtype in GGML_TYPES:
            self.used.add(name)
            return QuantTensor(self.file.raw(name), GGML_TYPES[entry.dtype], entry.shape, name)
        return _as_quant(self._values(name), name)

    def _values(self, name: str) -> torch.Tensor:
        """One file tensor as a torch tensor of a servable dtype (FP8 dequantized)."""
        entry = self.file.tensors[name]
        self.used.add(name)
        if entry.dtype in GGML_TYPES:
            return self.file.typed(name)
        if entry.dtype != "F8_E4M3":
            raise UnsupportedError(
                f"tensor {name!r} in {self.file.directory.name} has dtype {entry.dtype}, which tandem does not serve"
            )
        if self.fp8_block is None:
            raise WeightError(f"tensor {name!r} is FP8 but config.json has no fp8 quantization_config")
        scale = name + SCALE_SUFFIX
        if scale not in self.file.tensors:
            raise WeightError(
                f"tensor {scale!r} (the scales of FP8 {name!r}) is missing from {self.file.directory.name}"
            )
        self.used.add(scale)
        return dequantize_fp8_blocks(
            self.file.typed(name), self.file.typed(scale), self.fp8_block, self.fp8_dtype, name
        )


def _file_names(hf_name: str, config: PretrainedConfig) -> list[str]:
    """The names a parameter may have in a checkpoint, in the order they are tried."""
    names = [hf_name]
    if ".mlp." in hf_name and getattr(config, "model_type", "") in ("mixtral", "minimax"):
        names.append(hf_name.replace(".mlp.", ".block_sparse_moe."))  # Mixtral's original layout
    if hf_name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        names.append("model.embed_tokens.weight")  # tied: saved once, under the embedding
    return names


def _n_experts(config: PretrainedConfig) -> int:
    for key in ("n_routed_experts", "num_local_experts", "num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise WeightError(f"config of model type {config.model_type!r} names no expert count")


def _split_gate_up(fused: QuantTensor) -> list[QuantTensor]:
    """A fused [E, 2I, H] gate_up as gate [E, I, H] and up [E, I, H] (copies: neither half is contiguous)."""
    if len(fused.shape) != 3 or fused.shape[1] % 2:
        raise WeightError(f"tensor {fused.name!r} has shape {list(fused.shape)}, not [E, 2I, H]")
    e, two_i, h = fused.shape
    rows = fused.data.view(e, 2, two_i // 2 * fused.row_bytes)  # [E, gate|up, I*H bytes]
    return [
        QuantTensor(
            rows[:, k].contiguous().view(-1), fused.ggml_type, (e, two_i // 2, h), f"{fused.name}[{which}]"
        )
        for k, which in enumerate(("gate", "up"))
    ]


def _as_quant(values: torch.Tensor, name: str) -> QuantTensor:
    dtype = SERVED_DTYPES.get(values.dtype) or {torch.float16: "F16"}.get(values.dtype)
    data = values.contiguous().view(-1).view(torch.uint8)
    return QuantTensor(data, GGML_TYPES[dtype], tuple(values.shape), name)


def hf_stop_token_ids(directory: Path, tokenizer) -> list[int]:
    """The tokenizer's eos id, then generation_config.json's eos ids (chat models list end-of-turn there)."""
    ids = [tokenizer.eos_token_id]
    path = directory / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            eos = None
        ids += eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))
