"""MLA's fused decode kernels against tandem.ops.mla's torch arithmetic (tandem.ops.mla_math).

Compiled on a GPU; elsewhere under Triton's interpreter on CPU tensors."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, under its interpreter (tests/conftest.py)

from tandem.cpu.engine import torch_reference
from tandem.engine.kv_cache import new_cache
from tandem.gpu.mla_kernels import (
    ROPE_HALF,
    ROPE_V2_COMPLEX,
    ROPE_V3_INTERLEAVED,
    mla_decode_attention,
    mla_rope_append,
)
from tandem.inject.model import load_model
from tandem.ops.mla import MLAttention
from tandem.ops.mla_math import apply_rope, attend
from tandem.synth.tiny import write_tiny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mla_rope_append_reference(
    q, kv, kv_norm, eps, position_embeddings, mode, position, latents, rope_keys, heads
):
    """tandem.ops.mla's torch calls for the same step."""
    lat, r = latents.shape[-1], rope_keys.shape[-1]
    q_rope = q.float().view(1, heads, 1, -1)[..., -r:]
    c, k = kv.float()[:lat], kv.float()[lat:].view(1, 1, 1, r)
    c = c * torch.rsqrt(c.pow(2).mean() + eps) * kv_norm
    q_rope, k = apply_rope(q_rope, k, position_embeddings, mode == ROPE_V3_INTERLEAVED)
    latents.index_copy_(2, position, c.view(1, 1, 1, lat).to(latents.dtype))
    rope_keys.index_copy_(2, position, k.to(rope_keys.dtype))
    return q_rope.reshape(heads, r)


def mla_decode_attention_reference(q_lat, q_rope, latents, rope_keys, position, scale):
    """tandem.ops.mla's absorbed scores, softmax and value product for the same step."""
    last = int(position.item()) + 1
    c, k = latents[:, :, :last].float(), rope_keys[:, :, :last].float()
    heads = q_lat.shape[0]
    scores = q_lat.float().view(1, heads, 1, -1) @ c.transpose(2, 3)
    scores = scores + q_rope.float().view(1, heads, 1, -1) @ k.transpose(2, 3)
    p = attend(scores * scale, None)  # [1, H, 1, S]
    return (p @ c).view(heads, -1)


def rotation(mode: int, r: int, gen):
    """One position's rotary embedding in the layout `mode` stands for."""
    angle = torch.rand(r // 2, generator=gen) * 6.28
    if mode == ROPE_V2_COMPLEX:
        return torch.polar(torch.ones(r // 2), angle).view(1, 1, r // 2).to(DEVICE)
    cos, sin = angle.cos().repeat(2) * 1.1, angle.sin().repeat(2) * 1.1  # YaRN-like magnitude
    return cos.view(1, 1, r).to(DEVICE), sin.view(1, 1, r).to(DEVICE)


@pytest.mark.parametrize("mode", [ROPE_HALF, ROPE_V3_INTERLEAVED, ROPE_V2_COMPLEX])
@pytest.mark.parametrize(("heads", "nope", "lat", "r"), [(16, 128, 512, 64), (4, 16, 32, 16)])
def test_rope_append_equals_the_torch_path(mode, heads, nope, lat, r):
    gen = torch.Generator().manual_seed(heads + mode)
    q = torch.randn(heads * (nope + r), generator=gen).to(DEVICE)
    kv = torch.randn(lat + r, generator=gen).to(DEVICE)
    norm = (torch.rand(lat, generator=gen) + 0.5).to(DEVICE)
    rope = rotation(mode, r, gen)
    position = torch.tensor([3], device=DEVICE)
    cache = (torch.randn(1, 1, 7, lat, generator=gen), torch.randn(1, 1, 7, r, generator=gen))
    mine = [t.clone().to(DEVICE) for t in cache]
    theirs = [t.clone().to(DEVICE) for t in cache]
    got = mla_rope_append(q, kv, norm, 1e-6, rope, mode, position, *mine, heads)
    want = mla_rope_append_reference(q, kv, norm, 1e-6, rope, mode, position, *theirs, heads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # row 3 written, the others kept


@pytest.mark.parametrize(
    ("heads", "lat", "r", "n", "position"),
    [(16, 512, 64, 300, 250), (4, 32, 16, 40, 0), (8, 512, 64, 33, 32)],
)
def test_decode_attention_equals_the_absorbed_torch_path(heads, lat, r, n, position):
    gen = torch.Generator().manual_seed(n)
    q_lat, q_rope = torch.randn(heads, lat, generator=gen), torch.randn(heads, r, generator=gen)
    latents, keys = torch.randn(1, 1, n, lat, generator=gen), torch.randn(1, 1, n, r, generator=gen)
    latents[:, :, position + 1 :] = 1e4  # rows past the position: would dominate any softmax they entered
    args = [t.to(DEVICE) for t in (q_lat, q_rope, latents, keys)]
    pos = torch.tensor([position], device=DEVICE)
    got = mla_decode_attention(*args, pos, 0.07)
    want = mla_decode_attention_reference(*args, pos, 0.07)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("variant", ["v3", "v2"])  # V3's (cos, sin), V2's complex rotation
def test_the_fused_step_equals_mlas_absorbed_torch_step(variant, tmp_path):
    """MLAttention's one-token step through the kernels (`_gpu_step`, what a GPU decode step
    runs) against its torch absorbed form on the same inputs and cache."""
    path = write_tiny("deepseek2", tmp_path / "m.gguf", "F32", variant=variant)
    with torch_reference():  # on the CPU: torch's absorbed form, not the engine's
        model = load_model(path, device=DEVICE).model
    attn = next(m for m in model.modules() if isinstance(m, MLAttention))
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cache = new_cache(model)
    with torch.inference_mode():
        model(
            input_ids=torch.tensor([[5, 9, 13, 17, 21]], device=DEVICE), past_key_values=cache, use_cache=True
        )
        seen.clear()
        model(
            input_ids=torch.tensor([[7]], device=DEVICE), past_key_values=copy.deepcopy(cache), use_cache=True
        )
        hook.remove()
        hidden, rotary = seen["hidden_states"], seen["position_embeddings"]
        theirs = copy.deepcopy(cache)
        want = attn(hidden_states=hidden, position_embeddings=rotary, attention_mask=None, cache=theirs)[0]
        mine = copy.deepcopy(cache)
        layer = mine.layers[attn.layer_idx]
        got = attn._gpu_step(*attn._project(hidden.float()), rotary, layer)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    ours, ref = layer, theirs.layers[attn.layer_idx]
    assert ours.length == ref.length == 6
    torch.testing.assert_close(ours._k[:, :, :6], ref._k[:, :, :6], rtol=1e-5, atol=1e-6)  # latents
    torch.testing.assert_close(ours._v[:, :, :6], ref._v[:, :, :6], rtol=1e-5, atol=1e-6)  # rope keys
