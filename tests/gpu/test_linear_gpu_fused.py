"""Sibling GPU projections of one input as one product: the same outputs in any call order.

On a GPU compiled; elsewhere QuantLinearGPU runs under Triton's interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

pytest.importorskip("triton")  # without a GPU, under its interpreter (tests/conftest.py)

from tandem.ops.linear_gpu_fused import fuse_shared_inputs
from tests.gpu.test_linear_gpu import QuantWeights, layer


class Attention(nn.Module):
    def __init__(self, bias_seed: int = 0, dtype: str = "float32"):
        super().__init__()
        for i, (name, rows) in enumerate((("q_proj", 64), ("k_proj", 16), ("v_proj", 32))):
            setattr(self, name, layer(QuantWeights([(T.Q8_0, rows)], 256, seed=bias_seed + i), dtype=dtype))


def outputs(module: Attention, x: torch.Tensor, order=("q_proj", "k_proj", "v_proj")):
    return {name: getattr(module, name)(x) for name in order}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_siblings_give_each_its_own_output_in_any_order(dtype):
    module = Attention(dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x, other = torch.randn(2, 3, 256, generator=gen), torch.randn(2, 3, 256, generator=gen)
    device = module.q_proj.parts[0].dense.device
    x, other = x.to(device), other.to(device)
    want, want_other = outputs(module, x), outputs(module, other)
    assert fuse_shared_inputs(module) == 1
    assert all(getattr(module, n).parts[0].dense is None for n in ("q_proj", "k_proj", "v_proj"))
    bound = 1e-6 if dtype == "float32" else 1e-2
    for order in (("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj")):
        got = outputs(module, x, order)
        for name, y in got.items():
            assert y.shape == want[name].shape and y.dtype == x.dtype
            assert ((y - want[name]).norm() / want[name].norm()).item() < bound, name
    # A sibling called on another input, or twice on one, computes again.
    assert ((module.k_proj(other) - want_other["k_proj"]).norm() / want_other["k_proj"].norm()) < bound
    assert ((module.k_proj(other) - want_other["k_proj"]).norm() / want_other["k_proj"].norm()) < bound
    assert ((module.q_proj(x) - want["q_proj"]).norm() / want["q_proj"].norm()) < bound


def test_siblings_that_differ_stay_apart():
    module = Attention()
    module.k_proj = layer(
        QuantWeights([(T.Q8_0, 16)], 256, seed=5), dequant="none"
    )  # blocks, no dense weight
    assert fuse_shared_inputs(module) == 0
    assert module.q_proj.shared is None
