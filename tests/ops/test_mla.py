"""MLA against transformers' DeepSeek-V2/V3 attention (random tiny configs, float32).

Bounds: plain vs Hugging Face 1e-5 relative (max abs error / max abs value); absorbed vs
plain 1e-4 relative; whole models with the op swapped in give the same 16 greedy tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from deepseek_tiny import cache_kw, rel, tiny_model
from fake_weights import FakeWeights
from transformers import DynamicCache

from tandem.errors import RuleError
from tandem.ops.mla import MLAttention


def swap(model, **kwargs) -> list[MLAttention]:
    ops = []
    for i, layer in enumerate(model.model.layers):
        key = f"model.layers.{i}.self_attn"
        op = MLAttention(key, layer.self_attn, model.config, **kwargs)
        op.load(FakeWeights.of(layer.self_attn, key))
        layer.self_attn = op
        ops.append(op)
    return ops


CONFIGS = [
    ("v2", None, False),
    ("v2", 12, True),
    ("v3", None, True),
    ("v3", 12, False),
    ("v3", 12, True),
]
IDS = [f"{f}-q{q}-{'yarn' if y else 'rope'}" for f, q, y in CONFIGS]


def run_steps(attn, model, hidden: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Prefill `prefill` tokens into a fresh DynamicCache, then decode the rest one by one."""
    cache = DynamicCache()
    outs, start = [], 0
    for end in [prefill, *range(prefill + 1, hidden.shape[1] + 1)]:
        h = hidden[:, start:end]
        pos = torch.arange(start, end)[None].expand(h.shape[0], -1)
        pe = model.model.rotary_emb(h, pos)
        with torch.no_grad():
            kw = {cache_kw(attn) if not isinstance(attn, MLAttention) else "cache": cache}
            out, _ = attn(hidden_states=h, position_embeddings=pe, attention_mask=None, **kw)
        outs.append(out)
        start = end
    return outs


@pytest.mark.parametrize(("family", "q_lora", "yarn"), CONFIGS, ids=IDS)
def test_plain_and_absorbed_match_hf(family, q_lora, yarn):
    model = tiny_model(family, q_lora, yarn)
    hf = model.model.layers[1].self_attn
    key = "model.layers.1.self_attn"
    weights = FakeWeights.of(hf, key)
    plain = MLAttention(key, hf, model.config)
    absorbed = MLAttention(key, hf, model.config, generate_op="absorbed", prefill_op="absorbed")
    for op in (plain, absorbed):
        op.load(weights)
    assert plain.scaling == pytest.approx(hf.scaling, rel=1e-12)
    if yarn:  # the mscale correction is in: (1 + 0.1 ln 4)^2 times qk_head_dim^-1/2
        assert plain.scaling == pytest.approx(20**-0.5 * (1 + 0.1 * math.log(4.0)) ** 2, rel=1e-12)
    hidden = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    ref = run_steps(hf, model, hidden, prefill=6)
    got = run_steps(plain, model, hidden, prefill=6)
    alt = run_steps(absorbed, model, hidden, prefill=6)
    for r, g, a in zip(ref, got, alt, strict=True):
        assert rel(g, r) < 1e-5
        assert rel(a, g) < 1e-4


def test_rotate_half_layout():
    # DeepSeek-V3 checkpoints converted without interleaving rotate halves instead of pairs.
    test_model = tiny_model("v3", 12, True, interleave=False)
    hf = test_model.model.layers[0].self_attn
    op = MLAttention("a", hf, test_model.config, generate_op="absorbed")
    op.load(FakeWeights.of(hf, "a"))
    hidden = torch.randn(1, 5, 32)
    for r, g in zip(run_steps(hf, test_model, hidden, 3), run_steps(op, test_model, hidden, 3), strict=True):
        assert rel(g, r) < 1e-4


def test_chunked_prefill_with_mask():
    # A second multi-token chunk after a cached prefix: the mask is bottom-right causal.
    model = tiny_model("v3", 12, True)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
    swap(model, generate_op="absorbed", prefill_op="absorbed")
    cache = {cache_kw(model): DynamicCache(config=model.config)}
    with torch.no_grad():
        first = model(ids[:, :4], use_cache=True, **cache).logits
        second = model(ids[:, 4:], use_cache=True, **cache).logits
    assert rel(torch.cat([first, second], dim=1), full) < 1e-4


@pytest.mark.parametrize("form", ["plain", "absorbed"])
def test_bfloat16_mla_with_a_float32_mask_stays_bfloat16(form):
    # The default on a GPU. The mask's float32 bias must not promote the probabilities
    # (a bf16 @ float32 matmul fails), and the result follows float32.
    model = tiny_model("v3", 12, True)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
    swap(model, generate_op=form, prefill_op=form, dtype="bfloat16")
    cache = {cache_kw(model): DynamicCache(config=model.config)}
    with torch.no_grad():
        first = model(ids[:, :4], use_cache=True, **cache).logits
        second = model(ids[:, 4:], use_cache=True, **cache).logits
    assert rel(torch.cat([first, second], dim=1), full) < 3e-2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["v2", "v3"])
@pytest.mark.parametrize(
    ("prefill_op", "generate_op"), [("plain", "plain"), ("plain", "absorbed"), ("absorbed", "absorbed")]
)
def test_model_greedy_tokens(family, prefill_op, generate_op, cache):
    model = tiny_model(family, 12, True)
    prompt = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(7))
    args = dict(
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        cache_implementation=cache,
    )
    with torch.no_grad():
        ref = model.generate(prompt, **args)
        swap(model, prefill_op=prefill_op, generate_op=generate_op)
        got = model.generate(prompt, **args)
    assert got.sequences.shape[1] == 7 + 16
    assert torch.equal(got.sequences, ref.sequences)
    assert rel(torch.stack(got.logits), torch.stack(ref.logits)) < 1e-4


def test_bad_kwargs():
    model = tiny_model("v3", None, False)
    attn = model.model.layers[0].self_attn
    with pytest.raises(RuleError, match="generate_op"):
        MLAttention("a", attn, model.config, generate_op="fast")
    with pytest.raises(RuleError, match="MLA"):
        MLAttention("a", model.model.layers[0].mlp, model.config)
