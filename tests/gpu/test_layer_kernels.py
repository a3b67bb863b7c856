"""The fused per-layer decode kernels against their torch references.

Compiled on a GPU; elsewhere under Triton's interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, under its interpreter (tests/conftest.py)

from tandem.gpu.layer_kernels import (
    Routing,
    expert_sum,
    expert_sum_reference,
    qkv_rope_append,
    qkv_rope_append_reference,
    rms_norm,
    rms_norm_reference,
    route_pack,
    route_pack_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PINNED = torch.cuda.is_available()  # host memory the GPU writes and reads (the engine's buffers)


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("n", [64, 100, 2048, 7168])
@pytest.mark.parametrize("residual", ["none", "add", "add+bias"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_equals_the_reference(n, residual, out_dtype):
    gen = torch.Generator().manual_seed(n)
    x, scale = randn(2, n, gen=gen), randn(n, gen=gen).abs() + 0.5
    d = randn(2, n, gen=gen, dtype=torch.bfloat16) if residual != "none" else None
    bias = randn(n, gen=gen) if residual == "add+bias" else None
    h, y = rms_norm(x, scale, 1e-6, out_dtype, d, bias)
    h_ref, y_ref = rms_norm_reference(x, scale, 1e-6, out_dtype, d, bias)
    if d is None:
        assert h is None
    else:
        torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # one float32 add per element, both ways
    assert y.dtype == out_dtype
    bound = 1e-6 if out_dtype == torch.float32 else 8e-3  # bf16: half an ulp of rounding either way
    assert ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item() < bound


@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 4, 128), (8, 8, 64), (4, 1, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("head_norms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qkv_rope_append_equals_the_reference(hq, hkv, d, bias, head_norms, dtype):
    gen = torch.Generator().manual_seed(hq * d)
    width = (hq + 2 * hkv) * d
    qkv = randn(width, gen=gen, dtype=dtype)
    b = randn(width, gen=gen) if bias else None
    qn = randn(d, gen=gen).abs() + 0.5 if head_norms else None
    kn = randn(d, gen=gen).abs() + 0.5 if head_norms else None
    angle = torch.rand(d // 2, generator=gen).repeat(2) * 6.28
    cos, sin = angle.cos().to(DEVICE), angle.sin().to(DEVICE)
    position = torch.tensor([5], device=DEVICE)
    keys, values = randn(1, hkv, 9, d, gen=gen), randn(1, hkv, 9, d, gen=gen)
    caches = [(keys.clone(), values.clone()) for _ in range(2)]
    q = qkv_rope_append(qkv, b, qn, kn, 1e-6, cos, sin, position, *caches[0], hq)
    q_ref = qkv_rope_append_reference(qkv, b, qn, kn, 1e-6, cos, sin, position, *caches[1], hq)
    assert q.shape == (1, hq, 1, d)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(caches[0], caches[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # row 5 written, the rest kept


ROUTINGS = {
    "qwen3": lambda k: Routing(top_k=k, renormalize=True),
    "qwen2moe": lambda k: Routing(top_k=k),
    "deepseek-v2-lite": lambda k: Routing(top_k=k, scaling=2.5),
    "deepseek-v2": lambda k: Routing(top_k=k, groups=8, topk_group=3, scaling=16.0),
    "deepseek-v3": lambda k: Routing(
        top_k=k,
        renormalize=True,
        sigmoid=True,
        groups=8,
        topk_group=4,
        group_top2=True,
        renorm_eps=1e-20,
        scaling=2.5,
    ),
}


@pytest.mark.parametrize("family", sorted(ROUTINGS))
@pytest.mark.parametrize(("n_experts", "k"), [(256, 8), (64, 6), (128, 8)])
def test_route_pack_equals_the_routers_torch_calls(family, n_experts, k):
    gen = torch.Generator().manual_seed(n_experts + k)
    routing = ROUTINGS[family](k)
    logits, x = randn(n_experts, gen=gen), randn(2048, gen=gen)
    bias = randn(n_experts, gen=gen) * 0.1 if routing.sigmoid else None
    outs = [
        (torch.empty(k, dtype=torch.int64, device=DEVICE), torch.empty(k, device=DEVICE), torch.empty_like(x))
        for _ in range(2)
    ]
    route_pack(logits, x, routing, *outs[0], bias=bias)
    route_pack_reference(logits, x, routing, *outs[1], bias=bias)
    assert torch.equal(outs[0][0], outs[1][0])  # the same experts in the same order
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-6)
    assert torch.equal(outs[0][2], x)


def test_route_pack_groups_keep_only_the_best_groups():
    # 4 groups of 4; the two best groups by their two best choices are 2 and 0, although
    # group 1 holds the single best expert.
    logits = torch.tensor([2.0, 2.0, 0, 0, 5.0, -9, -9, -9, 3.0, 3.0, 0, 0, 0, 0, 0, 0], device=DEVICE)
    routing = Routing(top_k=3, sigmoid=True, groups=4, topk_group=2, group_top2=True)
    ids = torch.empty(3, dtype=torch.int64, device=DEVICE)
    route_pack(logits, torch.zeros(4, device=DEVICE), routing, ids, torch.empty(3, device=DEVICE),
               torch.empty(4, device=DEVICE))  # fmt: skip
    assert ids.tolist() == [8, 9, 0]


def test_route_pack_breaks_ties_to_the_lower_expert():
    logits = torch.zeros(16, device=DEVICE)
    logits[[3, 9, 12]] = 1.0
    ids = torch.empty(2, dtype=torch.int64, device=DEVICE)
    route_pack(logits, torch.zeros(4, device=DEVICE), Routing(top_k=2, renormalize=True), ids,
               torch.empty(2, device=DEVICE), torch.empty(4, device=DEVICE))  # fmt: skip
    assert ids.tolist() == [3, 9]


def test_grouped_routing_takes_powers_of_two_only():
    assert Routing(top_k=8, groups=8, topk_group=4).supported(256)
    assert not Routing(top_k=8, groups=8, topk_group=4).supported(160)  # DeepSeek-V2's 160 experts
    assert Routing(top_k=6).supported(160)
    with pytest.raises(ValueError, match="does not take"):
        route_pack(torch.zeros(160, device=DEVICE), torch.zeros(4, device=DEVICE),
                   Routing(top_k=6, groups=8, topk_group=3), torch.empty(6, dtype=torch.int64, device=DEVICE),
                   torch.empty(6, device=DEVICE), torch.empty(4, device=DEVICE))  # fmt: skip


def host(*shape, dtype=torch.float32):
    """Zeroed host memory as the engine's buffers are: page-locked where a GPU runs."""
    return torch.zeros(*shape, dtype=dtype, pin_memory=PINNED)


def test_route_pack_writes_host_memory_then_the_request_word():
    gen = torch.Generator().manual_seed(5)
    logits, x = randn(64, gen=gen), randn(2048, gen=gen)
    routing = Routing(top_k=6, renormalize=True)
    ids, weights, x_out, word = host(6, dtype=torch.int64), host(6), host(2048), host(16, dtype=torch.int32)
    route_pack(logits, x, routing, ids, weights, x_out, signal=(word[0:1], 77))
    if PINNED:
        torch.cuda.synchronize()
    ref = (torch.empty(6, dtype=torch.int64), torch.empty(6), torch.empty(2048))
    route_pack_reference(logits.cpu(), x.cpu(), routing, *ref)
    assert word.tolist() == [77] + [0] * 15  # the code, and nothing beside it
    assert torch.equal(ids, ref[0]) and torch.equal(x_out, x.cpu())
    torch.testing.assert_close(weights, ref[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2048, 7168, 100])
@pytest.mark.parametrize("shared_dtype", [None, torch.float32, torch.bfloat16], ids=str)
def test_expert_sum_equals_the_reference_and_takes_the_answer(n, shared_dtype):
    gen = torch.Generator().manual_seed(n)
    h = randn(n, gen=gen)
    out = host(n)
    out.copy_(torch.randn(n, generator=gen))  # as the engine writes it
    shared = randn(n, gen=gen, dtype=shared_dtype) if shared_dtype is not None else None
    words = host(2, dtype=torch.int32)
    words[1] = 9  # the engine's answer
    y = expert_sum(h, out, shared, words[1:2])
    if PINNED:
        torch.cuda.synchronize()
    assert words.tolist() == [0, 0]
    torch.testing.assert_close(y, expert_sum_reference(h, out, shared), rtol=0, atol=0)
    assert y.device == h.device and y.dtype == torch.float32
