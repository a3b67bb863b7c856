"""The engine's rotate-half RoPE (csrc/engine/rope.cpp) against transformers' arithmetic,
and its routing: only attention modules of models loaded onto the engine take it."""

from __future__ import annotations

import pytest
import torch

from tandem.cpu.engine import CPUEngine
from tandem.ops import rope_cpu
from tandem.synth.tiny import write_tiny
from tests.cpu.engine_models import count_calls, load_both


def cos_sin(batch: int, t: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(batch, t, d // 2, generator=g) * 6.3
    angles = torch.cat((angles, angles), dim=-1)  # transformers repeats the frequencies
    return angles.cos(), angles.sin()


@pytest.mark.parametrize(
    "layout,batch,shared",
    [("bthd", 1, True), ("bthd", 2, False), ("bthd", 2, True), ("bhtd", 3, False)],
)
@pytest.mark.parametrize("t", [1, 7, 300])  # 300 positions: on the pool
def test_rope_matches_transformers_arithmetic(layout, batch, shared, t):
    heads, d = 5, 64
    g = torch.Generator().manual_seed(t)
    if layout == "bthd":  # the projections' layout, viewed as [B, H, T, D]
        x = torch.randn(batch, t, heads, d, generator=g).transpose(1, 2)
    else:
        x = torch.randn(batch, heads, t, d, generator=g)
    cos, sin = cos_sin(1 if shared else batch, t, d, seed=t + 1)
    out = CPUEngine(threads=2).rope_half(x, cos, sin)
    expected = rope_cpu.rope_reference(x, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
    assert out is not None and out.shape == x.shape and out.stride() == x.stride()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_rope_refuses_tensors_outside_its_form():
    engine = CPUEngine(threads=1)
    x = torch.randn(1, 2, 3, 8)
    cos, sin = cos_sin(1, 3, 8, seed=0)
    assert engine.rope_half(x.double(), cos.double(), sin.double()) is None
    assert engine.rope_half(x[..., :7], cos[..., :7], sin[..., :7]) is None  # odd head size
    assert engine.rope_half(x, cos[:, :2], sin[:, :2]) is None  # positions disagree
    assert engine.rope_half(x.transpose(2, 3), cos, sin) is None  # head dim not contiguous


def test_only_engine_models_take_the_engine_rope(tmp_path, monkeypatch):
    path = write_tiny("qwen3moe", tmp_path / "rope.gguf", "Q8_0")
    calls = count_calls(monkeypatch, "rope_half")
    fast, ref = (loaded.model for loaded in load_both(path))
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref(input_ids=ids).logits
        assert calls == []  # the torch model keeps transformers' RoPE
        got = fast(input_ids=ids).logits
    layers = fast.config.num_hidden_layers
    assert len(calls) == 2 * layers  # q and k of every layer
    assert float((got - expected).norm() / expected.norm()) < 3e-2
