"""A prompt's experts as padded batches on the GPU's copy of the blocks, against float64.

On a GPU the Triton dequantization runs compiled and the products in bf16; elsewhere
under Triton's interpreter on CPU tensors, in float32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, under its interpreter (tests/conftest.py)

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from tandem.gpu.moe_batched import batched_experts
from tandem.quant.quant_tensor import QuantTensor
from tests.random_quant import random_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E, INTER, H = 6, 256, 256  # K-quant rows are whole super-blocks of 256


def experts(ggml_type: T, shape: tuple[int, int, int], seed: int) -> tuple[QuantTensor, torch.Tensor]:
    """(blocks in CPU memory, float64 values from gguf's dequantization)."""
    block, _ = GGML_QUANT_SIZES[ggml_type]
    n = shape[0] * shape[1] * shape[2]
    raw = random_blocks(ggml_type, n // block, seed=seed, max_exponent=0).reshape(-1)
    dense = torch.from_numpy(gguf_dequantize(raw, ggml_type).reshape(shape).copy()).double()
    return QuantTensor(torch.from_numpy(raw.copy()), ggml_type, shape, f"t{seed}"), dense


def exact(wg, wu, wd, x, ids, weights) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            if 0 <= e < wg.shape[0]:
                h = torch.nn.functional.silu(wg[e] @ x[t]) * (wu[e] @ x[t])
                out[t] += weights[t, j].double() * (wd[e] @ h)
    return out


@pytest.mark.parametrize("types", [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0), (T.Q5_K, T.Q4_K)], ids=str)
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # one expert per chunk, all at once
def test_batched_experts_equal_the_float64_sum(types, chunk_bytes):
    (gate, wg), (up, wu), (down, wd) = (
        experts(types[0], (E, INTER, H), 1),
        experts(types[0], (E, INTER, H), 2),
        experts(types[1], (E, H, INTER), 3),
    )
    gen = torch.Generator().manual_seed(4)
    n, k = 20, 2
    x = torch.randn(n, H, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:k] for _ in range(n)])  # expert E-1 gets none
    ids[3, 1] = E  # transformers' dropped slot
    weights = torch.rand(n, k, generator=gen)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    got = batched_experts(
        x.float().to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), gate, up, down,
        torch.nn.functional.silu, dtype=dtype, chunk_bytes=chunk_bytes,
    ).cpu()  # fmt: skip
    want = exact(wg, wu, wd, x.float().double(), ids, weights)
    assert got.dtype == torch.float32 and got.shape == (n, H)
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 products on a GPU, float32 elsewhere
    assert ((got.double() - want).norm() / want.norm()).item() < bound


def test_no_routed_slot_gives_zeros():
    (gate, _), (up, _), (down, _) = (
        experts(T.Q8_0, (E, INTER, H), 1),
        experts(T.Q8_0, (E, INTER, H), 2),
        experts(T.Q8_0, (E, H, INTER), 3),
    )
    x = torch.randn(3, H, device=DEVICE)
    ids = torch.full((3, 2), E, device=DEVICE)
    out = batched_experts(x, ids, torch.ones(3, 2, device=DEVICE), gate, up, down, torch.nn.functional.silu)
    assert torch.equal(out.cpu(), torch.zeros(3, H))


def test_a_call_prefetching_the_next_ones_first_chunk_changes_no_result():
    """`then` starts the next call's first copy early: taken when the next call is that
    one, dropped when it is not."""
    layers = [
        tuple(experts(t, shape, seed + 10 * i)[0] for t, shape, seed in
              ((T.Q4_K, (E, INTER, H), 1), (T.Q4_K, (E, INTER, H), 2), (T.Q6_K, (E, H, INTER), 3)))
        for i in range(3)
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(12, H, generator=gen).to(DEVICE)
    ids = torch.randint(0, E, (12, 2), generator=gen).to(DEVICE)
    weights = torch.rand(12, 2, generator=gen).to(DEVICE)
    silu = torch.nn.functional.silu

    def run(layer, then=None):
        return batched_experts(x, ids, weights, *layers[layer], silu, chunk_bytes=1, then=then).cpu()

    def same(a, b):  # index_add_ on a GPU sums in any order
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    alone = [run(i) for i in range(3)]
    assert same(run(0, then=layers[1]), alone[0])
    assert same(run(1, then=layers[0]), alone[1])  # prefetched layer 0, but layer 2 comes
    assert same(run(2), alone[2])
    assert same(run(0, then=layers[1]), alone[0])
    assert same(run(1), alone[1])  # the prefetched chunk taken


def test_a_prefetched_range_serves_any_range_inside_it():
    """The stager's bookkeeping (no device needed): experts [2, 4) out of a copy of [0, 6)."""
    from tandem.gpu.moe_batched import _key, _Stager

    (gate, _), (up, _), (down, _) = (
        experts(T.Q8_0, (E, INTER, H), 1),
        experts(T.Q8_0, (E, INTER, H), 2),
        experts(T.Q8_0, (E, H, INTER), 3),
    )
    tensors = (gate, up, down)
    stager = object.__new__(_Stager)
    stager.ahead = (_key(tensors), 0, E, ([qt.data.clone() for qt in tensors], "tag"))
    views, tag = stager.take(tensors, 2, 4)
    assert tag == "tag" and stager.ahead is None  # taken once
    for view, qt in zip(views, tensors, strict=True):
        size = qt.shape[1] * qt.row_bytes
        assert torch.equal(view, qt.data[2 * size : 4 * size])
    stager.ahead = (_key(tensors), 1, 3, ([qt.data for qt in tensors], "tag"))
    assert stager.take(tensors, 0, 2) is None  # starts before the copy
    stager.ahead = (_key(tensors), 0, E, ([qt.data for qt in tensors], "tag"))
    assert stager.take((up, gate, down), 0, 2) is None  # other tensors
