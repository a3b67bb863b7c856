"""The engine's prompt attention (kernels/attention_prefill.inc) against torch's SDPA in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.cpu.engine import CPUEngine
from tests.cpu.variants import testable_variants as _testable_variants

VARIANTS = _testable_variants()


def reference(q, k, v, scale, window):
    t = q.shape[2]
    i = torch.arange(t)
    visible = i[None, :] <= i[:, None]
    if window:
        visible &= i[None, :] > i[:, None] - window
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)  # [1, T, Hq, Dv]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "hq,hkv,t,d,dv,window",
    [
        (8, 1, 37, 64, 64, 0),  # one kv head for eight query heads
        (4, 4, 130, 128, 128, 0),  # more keys than a block, blocks of query positions
        (6, 2, 300, 48, 80, 0),  # sizes off the vector width
        (4, 1, 150, 256, 256, 40),  # a sliding window
        (2, 2, 1, 32, 32, 0),  # a single position
    ],
)
def test_matches_sdpa(variant, hq, hkv, t, d, dv, window):
    g = torch.Generator().manual_seed(t + d)
    # The projections' layout, [1, T, H, D] viewed as [1, H, T, D]: strided rows.
    q = torch.randn(1, t, hq, d, generator=g).transpose(1, 2)
    k = torch.randn(1, t, hkv, d, generator=g).transpose(1, 2)
    v = torch.randn(1, t, hkv, dv, generator=g).transpose(1, 2)
    scale = d**-0.5
    out = CPUEngine(threads=3, variant=variant).attention_prefill(q, k, v, scale, window)
    want = reference(q, k, v, scale, window)
    assert out.shape == (1, t, hq, dv)
    assert float((out.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_refuses_what_is_not_a_prompt_against_itself():
    engine = CPUEngine(threads=1)
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 2, 7, 16)  # more keys than queries: a cached prefix
    assert engine.attention_prefill(q, kv, kv, 0.25) is None
    assert engine.attention_prefill(q.double(), q[:, :2].double(), q[:, :2].double(), 0.25) is None
    assert engine.attention_prefill(q, q[:, :3], q[:, :3], 0.25) is None  # 4 heads over 3


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
def test_a_long_prompt_takes_it_and_gives_the_torch_logits(tmp_path, monkeypatch, arch):
    from tandem.ops.attention_cpu import ENGINE_PROMPT_MIN
    from tandem.synth.tiny import write_tiny
    from tests.cpu.engine_models import count_calls, load_both

    path = write_tiny(arch, tmp_path / f"{arch}.gguf", "F16")
    calls = count_calls(monkeypatch, "attention_prefill")
    fast, ref = (loaded.model for loaded in load_both(path))
    ids = torch.randint(3, 200, (1, ENGINE_PROMPT_MIN + 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
        assert calls == []
        got = fast(input_ids=ids).logits
    assert len(calls) == fast.config.num_hidden_layers
    assert float((got - want).norm() / want.norm()) < 1e-5  # F16 weights: float rounding only
