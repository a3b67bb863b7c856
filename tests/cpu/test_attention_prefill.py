"""The engine's prompt attention against torch's SDPA in float64.

Bounds (asserted), of the largest output error against the largest output or value:
- the float32 kernel (kernels/attention_prefill.inc): 1e-5 of the largest output;
- the AMX-BF16 kernel (kernels/attention_prefill_amx.inc), where the amx kernels run it:
  2^-8 of the largest |v| against SDPA on q · scale, k and v rounded to bf16 (the weights'
  own rounding to bf16 moves an output by at most 2^-9 of it), and 2^-5 against SDPA on
  the float inputs; head sizes it does not take (d not a multiple of 32) keep the float32
  kernel's bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.cpu.engine import CPUEngine
from tests.cpu.variants import testable_variants as _testable_variants

VARIANTS = _testable_variants()


def reference(q, k, v, scale, window):
    """SDPA in float64 with the mask spelled out: query i at key index K - T + i."""
    t, n_keys = q.shape[2], k.shape[2]
    i = torch.arange(t)[:, None] + (n_keys - t)
    j = torch.arange(n_keys)[None, :]
    visible = j <= i
    if window:
        visible &= j > i - window
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=visible, scale=scale)
    return out.transpose(1, 2)  # [1, T, Hq, Dv]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "hq,hkv,t,prefix,d,dv,window",
    [
        (8, 1, 37, 0, 64, 64, 0),  # one kv head for eight query heads
        (4, 4, 130, 0, 128, 128, 0),  # more keys than a block, blocks of query positions
        (6, 2, 300, 0, 48, 80, 0),  # sizes off the vector width
        (4, 1, 150, 0, 256, 256, 40),  # a sliding window
        (2, 2, 1, 0, 32, 32, 0),  # a single position
        (4, 2, 70, 45, 64, 64, 0),  # after a cached prefix
        (4, 1, 90, 31, 128, 128, 50),  # after a prefix, with a window (a WindowLayer's kept keys)
    ],
)
def test_matches_sdpa(variant, hq, hkv, t, prefix, d, dv, window):
    q, k, v = inputs(hq, hkv, t, prefix, d, dv)
    scale = d**-0.5
    out = CPUEngine(threads=3, variant=variant, attention_bf16=False).attention_prefill(
        q, k, v, scale, window
    )
    want = reference(q, k, v, scale, window)
    assert out.shape == (1, t, hq, dv)
    assert float((out.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def inputs(hq, hkv, t, prefix, d, dv):
    g = torch.Generator().manual_seed(t + d)
    # The projections' layout, [1, T, H, D] viewed as [1, H, T, D]: strided rows.
    q = torch.randn(1, t, hq, d, generator=g).transpose(1, 2)
    k = torch.randn(1, prefix + t, hkv, d, generator=g).transpose(1, 2)
    v = torch.randn(1, prefix + t, hkv, dv, generator=g).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "hq,hkv,t,prefix,d,dv,window",
    [
        (8, 1, 37, 0, 64, 64, 0),  # part of one key block, a partial row tile
        (32, 4, 300, 0, 128, 128, 0),  # Qwen3-30B-A3B's heads, three key blocks
        (6, 2, 200, 0, 64, 80, 0),  # an odd number of 16-column value tiles
        (4, 1, 150, 0, 256, 256, 40),  # a sliding window
        (2, 2, 1, 0, 32, 32, 0),  # a single position
        (4, 2, 70, 45, 64, 64, 0),  # after a cached prefix
        (4, 1, 90, 131, 128, 128, 50),  # after a prefix longer than a key block, with a window
        (6, 2, 100, 0, 48, 80, 0),  # d not a multiple of 32: the float32 kernel
    ],
)
def test_bf16_kernel_matches_sdpa_on_bf16_inputs(variant, hq, hkv, t, prefix, d, dv, window):
    q, k, v = inputs(hq, hkv, t, prefix, d, dv)
    scale = d**-0.5
    engine = CPUEngine(threads=3, variant=variant, attention_bf16=True)
    out = engine.attention_prefill(q, k, v, scale, window).double()
    want = reference(q, k, v, scale, window)
    if not engine.attention_bf16_runs(d, dv):  # no such kernel here, or not for these sizes
        assert variant != "amx" or d % 32
        assert float((out - want).abs().max()) <= 1e-5 * float(want.abs().max())
        return
    bf16 = [x.to(torch.bfloat16).double() for x in (q * scale, k, v)]
    rounded = reference(*bf16, 1.0, window)
    v_max = float(v.abs().max())
    assert float((out - rounded).abs().max()) <= 2.0**-8 * v_max
    assert float((out - want).abs().max()) <= 2.0**-5 * v_max


def test_refuses_tensors_outside_its_form():
    engine = CPUEngine(threads=1)
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 2, 3, 16)  # fewer keys than queries
    assert engine.attention_prefill(q, kv, kv, 0.25) is None
    assert engine.attention_prefill(q.double(), q[:, :2].double(), q[:, :2].double(), 0.25) is None
    assert engine.attention_prefill(q, q[:, :3], q[:, :3], 0.25) is None  # 4 heads over 3


@pytest.mark.parametrize("arch", ["qwen3moe", "llama", "deepseek2"])  # deepseek2: its MLA layers' plain form
def test_a_long_prompt_takes_it_and_gives_the_torch_logits(tmp_path, monkeypatch, arch):
    from tandem.ops.attention_cpu import ENGINE_PROMPT_MIN
    from tandem.synth.tiny import write_tiny
    from tests.cpu.engine_models import count_calls, load_both, without_bf16_prefill

    without_bf16_prefill(monkeypatch)
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


@pytest.mark.parametrize("arch", ["gemma3", "qwen3moe"])
def test_prompts_after_a_cached_prefix_and_in_sliding_windows_take_it(tmp_path, monkeypatch, arch):
    from tandem.engine.kv_cache import new_cache
    from tandem.engine.model_io import cache_kwarg
    from tandem.ops.attention_cpu import ENGINE_PROMPT_MIN
    from tandem.synth.tiny import write_tiny
    from tests.cpu.engine_models import count_calls, load_both, without_bf16_prefill

    without_bf16_prefill(monkeypatch)
    path = write_tiny(arch, tmp_path / f"{arch}.gguf", "F16")
    calls = count_calls(monkeypatch, "attention_prefill")
    fast, ref = (loaded.model for loaded in load_both(path))
    layers = fast.config.num_hidden_layers
    n = ENGINE_PROMPT_MIN + 10
    ids = torch.randint(3, 200, (1, 20 + n), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = ref(input_ids=ids).logits[0]
        whole = fast(input_ids=ids).logits[0]  # Gemma's sliding layers: a windowed mask
        assert len(calls) == layers
        cache = new_cache(fast)
        fast(input_ids=ids[:, :20], **{cache_kwarg(fast): cache}, use_cache=True)  # a short prefix: SDPA
        assert len(calls) == layers
        rest = fast(input_ids=ids[:, 20:], **{cache_kwarg(fast): cache}, use_cache=True).logits[0]
    assert len(calls) == 2 * layers  # the long rest after its cached prefix
    assert float((whole - want).norm() / want.norm()) < 1e-5
    assert float((rest - want[20:]).norm() / want[20:].norm()) < 1e-5


def test_causal_masks_are_recognised_exactly():
    from tandem.ops.attention_cpu import is_causal_mask

    t, k = 6, 9  # 3 cached positions
    i = torch.arange(t)[:, None] + (k - t)
    j = torch.arange(k)[None, :]
    causal = (j <= i)[None, None]
    windowed = ((j <= i) & (j > i - 4))[None, None]
    assert is_causal_mask(causal, t, k, 0) and is_causal_mask(causal[..., :k], t, k, 0)  # a fresh view
    assert not is_causal_mask(causal, t, k, 4) and is_causal_mask(windowed, t, k, 4)
    wrong = causal.clone()
    wrong[0, 0, 2, 0] = False  # one key hidden that causality shows
    assert not is_causal_mask(wrong, t, k, 0)
    assert not is_causal_mask(causal.float(), t, k, 0) and not is_causal_mask(causal, t, k + 1, 0)
