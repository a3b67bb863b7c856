"""A stand-in for GGUFWeights that serves a module's own tensors by Hugging Face name."""

from __future__ import annotations

import torch
from torch import nn

from tandem.errors import WeightError


class FakeWeights:
    """dense(name, shape, dtype, device) from a {hf_name: tensor} dict; `quant` is not offered."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = {k: v.detach().clone() for k, v in tensors.items()}

    @classmethod
    def of(cls, module: nn.Module, prefix: str) -> FakeWeights:
        named = dict(module.named_parameters()) | dict(module.named_buffers())
        return cls({f"{prefix}.{k}": v for k, v in named.items()})

    def has(self, hf_name: str) -> bool:
        return hf_name in self.tensors

    def dense(self, hf_name, shape=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        if hf_name not in self.tensors:
            raise WeightError(f"no tensor {hf_name!r}")
        t = self.tensors[hf_name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise WeightError(f"{hf_name!r} has shape {list(t.shape)}, needs {list(shape)}")
        return t.to(device=device, dtype=dtype)

    def quant(self, hf_name, shape=None):
        raise WeightError(f"{hf_name!r}: the fake weights hold dense tensors only")
