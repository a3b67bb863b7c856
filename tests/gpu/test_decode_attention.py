"""The split-key decode attention kernel against its float64 torch reference.

Compiled on a GPU; elsewhere under Triton's interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, under its interpreter (tests/conftest.py)

from tandem.gpu.decode_attention import decode_attention, decode_attention_reference, supported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(hq, hkv, n, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, hq, d, generator=gen).transpose(1, 2)  # [1, Hq, 1, D], strided as HF's
    k = torch.randn(1, hkv, n, d, generator=gen)
    v = torch.randn(1, hkv, n, dv, generator=gen)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


@pytest.mark.parametrize(
    ("hq", "hkv", "n", "d", "dv"),
    [
        (32, 4, 7, 128, 128),
        (32, 4, 1000, 128, 128),
        (8, 8, 33, 64, 64),
        (16, 2, 300, 64, 32),
        (4, 1, 1, 16, 16),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_kernel_equals_the_reference(hq, hkv, n, d, dv, dtype):
    q, k, v = case(hq, hkv, n, d, dv, dtype)
    assert supported(q, k, v, None)
    got = decode_attention(q, k, v, None, d**-0.5)
    want = decode_attention_reference(q, k, v, None, d**-0.5)
    assert got.shape == (1, 1, hq, dv) and got.dtype == dtype
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < bound


def test_hidden_keys_do_not_count_even_when_a_whole_slice_is_hidden():
    q, k, v = case(8, 2, 700, 64, 64, torch.float32, seed=1)
    mask = torch.zeros(1, 1, 1, 800, dtype=torch.bool, device=DEVICE)  # longer than the keys, as a buffer's
    mask[..., :5] = True
    mask[..., 650:690] = True
    k[:, :, 5:650] = 1e4  # would dominate any softmax they entered
    got = decode_attention(q, k, v, mask, 0.125)
    want = decode_attention_reference(q, k, v, mask, 0.125)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_what_the_kernel_does_not_take_is_refused():
    q, k, v = case(8, 2, 10, 64, 64, torch.float32)
    assert not supported(q, k, v, torch.zeros(1, 1, 1, 10, device=DEVICE))  # an additive mask
    q2, k2, v2 = case(8, 2, 10, 48, 48, torch.float32)
    assert not supported(q2, k2, v2, None)  # head size not a power of two
    assert not supported(torch.cat([q, q], 2), k, v, None)  # two query positions
    per_head = torch.ones(1, 8, 1, 10, dtype=torch.bool, device=DEVICE)
    assert not supported(q, k, v, per_head)  # one row per head: not one mask for all


@pytest.mark.parametrize("position", [0, 37, 699])
def test_a_position_read_on_the_gpu_ends_the_keys(position):
    q, k, v = case(8, 2, 700, 64, 64, torch.float32, seed=2)
    k[:, :, position + 1 :] = 1e4  # rows past the position: would dominate any softmax they entered
    pos = torch.tensor([position], device=DEVICE)
    got = decode_attention(q, k, v, None, 0.125, position=pos, out_dtype=torch.bfloat16)
    want = decode_attention_reference(q, k, v, None, 0.125, position=pos, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 1e-2
