"""Weights by Hugging Face parameter name: a GGUF file seen through its architecture's name map."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from tandem.errors import WeightError
from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.arch.base import Architecture
from tandem.weights.gguf_file import GGUFFile


class GGUFWeights:
    """What operators load from: raw blocks or dequantized values of a named parameter.

    A fused parameter (see Architecture.fused_layer_tensors, e.g. the experts'
    `gate_up_proj`) is several GGUF tensors: `quant_parts` gives them raw, `dense`
    gives their concatenation along dim -2, and `quant` refuses it.
    """

    def __init__(self, gguf: GGUFFile, arch: Architecture, config: PretrainedConfig):
        self.gguf = gguf
        self.arch = arch
        self.config = config
        self.used: set[str] = set()  # GGUF tensor names something loaded

    def gguf_names(self, hf_name: str) -> tuple[str, ...]:
        """The GGUF tensors behind a parameter (several for a fused one), each checked to exist."""
        names = self.arch.gguf_tensor_parts(hf_name, self.config, self.gguf.tensors)
        if names is None:
            raise WeightError(
                f"parameter {hf_name!r} has no GGUF tensor in the {self.arch.gguf_name} name map"
            )
        for name in names:
            if name not in self.gguf.tensors:
                raise WeightError(
                    f"tensor {name!r} (for parameter {hf_name!r}) is missing from {self.gguf.paths[0].name}"
                )
        return names

    def gguf_name(self, hf_name: str) -> str:
        names = self.gguf_names(hf_name)
        if len(names) != 1:
            raise WeightError(
                f"parameter {hf_name!r} is fused from {len(names)} GGUF tensors ({', '.join(names)}): "
                "load it with quant_parts or dense"
            )
        return names[0]

    def has(self, hf_name: str) -> bool:
        names = self.arch.gguf_tensor_parts(hf_name, self.config, self.gguf.tensors)
        return names is not None and all(name in self.gguf.tensors for name in names)

    def quant(self, hf_name: str, shape: tuple[int, ...] | None = None) -> QuantTensor:
        """Raw blocks of a parameter in Hugging Face layout; `shape` is checked when given."""
        self.gguf_name(hf_name)  # refuses fused parameters
        return self.quant_parts(hf_name, shape)[0]

    def quant_parts(self, hf_name: str, shape: tuple[int, ...] | None = None) -> list[QuantTensor]:
        """Raw blocks of each GGUF part of a parameter, in order (one part unless it is fused).

        `shape` is the whole parameter's: the parts must agree with it on every
        dimension but -2, and their sizes along -2 must add up to its.
        """
        names = self.gguf_names(hf_name)
        parts = []
        for name in names:
            self.used.add(name)
            parts.append(self.arch.fix_quant(hf_name, self.gguf.tensor(name), self.config))
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
        """Dequantized values of a parameter in Hugging Face layout and convention."""
        names = self.gguf_names(hf_name)
        quants = self.quant_parts(hf_name)
        parts = [part.dequantize(torch.float32) for part in quants]
        values = self.arch.derive_dense(hf_name, names, parts, self.config)
        if values is None:
            if shape is not None:
                check_parts(hf_name, quants, tuple(shape))
            values = join_parts(parts)
        elif shape is not None and tuple(values.shape) != tuple(shape):
            raise WeightError(
                f"tensors {', '.join(names)} give {hf_name!r} shape {list(values.shape)}, not {list(shape)}"
            )
        values = self.arch.fix_dense(hf_name, values, self.config)
        return values.to(device=device, dtype=dtype)


def join_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    """Dequantized parts of one parameter as one tensor: fused parts (gate, up) stack on dim -2."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def check_parts(hf_name: str, parts: list[QuantTensor], shape: tuple[int, ...]) -> None:
    if len(parts) == 1:
        if tuple(parts[0].shape) != shape:
            raise WeightError(
                f"tensor {parts[0].name!r} has shape {list(parts[0].shape)}, but {hf_name!r} needs {list(shape)}"
            )
        return
    # [..., R_i, C] parts stack into [..., sum R_i, C]
    stack = len(shape) >= 2 and all(
        len(p.shape) == len(shape) and p.shape[:-2] + p.shape[-1:] == shape[:-2] + shape[-1:] for p in parts
    )
    if not stack or sum(p.shape[-2] for p in parts) != shape[-2]:
        found = ", ".join(f"{p.name!r} {list(p.shape)}" for p in parts)
        raise WeightError(
            f"tensors {found} do not stack along dim -2 into {list(shape)}, which {hf_name!r} needs"
        )
