"""Weights by Hugging Face parameter name: a GGUF file seen through its architecture's name map."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from tandem.errors import WeightError
from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.arch.base import Architecture
from tandem.weights.gguf_file import GGUFFile


class GGUFWeights:
    """What operators load from: raw blocks or dequantized values of a named parameter."""

    def __init__(self, gguf: GGUFFile, arch: Architecture, config: PretrainedConfig):
        self.gguf = gguf
        self.arch = arch
        self.config = config
        self.used: set[str] = set()  # GGUF tensor names something loaded

    def gguf_name(self, hf_name: str) -> str:
        name = self.arch.gguf_tensor_name(hf_name, self.config)
        if name is None:
            raise WeightError(
                f"parameter {hf_name!r} has no GGUF tensor in the {self.arch.gguf_name} name map"
            )
        if name not in self.gguf.tensors:
            raise WeightError(
                f"tensor {name!r} (for parameter {hf_name!r}) is missing from {self.gguf.paths[0].name}"
            )
        return name

    def has(self, hf_name: str) -> bool:
        name = self.arch.gguf_tensor_name(hf_name, self.config)
        return name is not None and name in self.gguf.tensors

    def quant(self, hf_name: str, shape: tuple[int, ...] | None = None) -> QuantTensor:
        """Raw blocks of a parameter in Hugging Face layout; `shape` is checked when given."""
        name = self.gguf_name(hf_name)
        self.used.add(name)
        tensor = self.arch.fix_quant(hf_name, self.gguf.tensor(name), self.config)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise WeightError(
                f"tensor {name!r} has shape {list(tensor.shape)}, but {hf_name!r} needs {list(shape)}"
            )
        return tensor

    def dense(
        self,
        hf_name: str,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Dequantized values of a parameter in Hugging Face layout and convention."""
        tensor = self.quant(hf_name, shape)
        values = self.arch.fix_dense(hf_name, tensor.dequantize(torch.float32), self.config)
        return values.to(device=device, dtype=dtype)
