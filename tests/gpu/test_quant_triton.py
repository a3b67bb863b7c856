"""The Triton kernels that read GGUF blocks, against the `gguf` package and torch.

On a GPU they run compiled; elsewhere under Triton's interpreter (set before the
kernels are defined), so the same tests check them on CPU-only machines that have
triton installed. Without triton they are skipped.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, under its interpreter (tests/conftest.py)

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from tandem.errors import UnsupportedError
from tandem.gpu import quant_triton
from tests.random_quant import random_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = [T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def weights(ggml_type: T, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 blocks on DEVICE, float64 values from gguf's numpy dequantization)."""
    block, _ = GGML_QUANT_SIZES[ggml_type]
    raw = random_blocks(ggml_type, rows * cols // block, seed=seed, max_exponent=0)
    dense = torch.from_numpy(gguf_dequantize(raw.reshape(-1), ggml_type).reshape(rows, cols).copy())
    return torch.from_numpy(raw.reshape(-1).copy()).to(DEVICE), dense.double()


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(1, 256), (19, 512), (40, 768)])
def test_dequantize_equals_gguf_bit_for_bit(ggml_type, rows, cols):
    blocks, want = weights(ggml_type, rows, cols, seed=rows + cols)
    got = quant_triton.dequantize(blocks, ggml_type, rows, cols, dtype=torch.float32).cpu()
    assert torch.equal(got, want.float())
    bf16 = quant_triton.dequantize(blocks, ggml_type, rows, cols).cpu()
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, want.float().bfloat16())


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n", [(19, 512, 1), (33, 768, 3)])
def test_matvec_equals_the_dense_product(ggml_type, rows, cols, n):
    blocks, dense = weights(ggml_type, rows, cols, seed=7 * rows + n)
    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = quant_triton.matvec(blocks, ggml_type, rows, x.float().to(DEVICE)).cpu().double()
    want = x.float().double() @ dense.T
    magnitude = x.abs() @ dense.abs().T
    assert ((got - want).abs() <= 1e-5 * magnitude + 1e-30).all()  # float32 sums of exact products


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n,k", [(1, 3), (2, 2)])
def test_routed_matvec_picks_each_slots_expert(ggml_type, n, k):
    experts, rows, cols = 3, 19, 512
    blocks, dense = weights(ggml_type, experts * rows, cols, seed=11 * n + k)
    dense = dense.view(experts, rows, cols)
    gen = torch.Generator().manual_seed(n + 10 * k)
    ids = torch.randint(0, experts, (n * k,), generator=gen)
    ids[-1] = experts  # transformers' dropped slot
    x = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    got = quant_triton.routed_matvec(
        blocks, ggml_type, experts, rows, ids.to(DEVICE), x.float().to(DEVICE), k
    )
    got = got.cpu().double()
    for s, e in enumerate(ids.tolist()):
        if e == experts:
            assert torch.equal(got[s], torch.zeros(rows, dtype=torch.float64))
            continue
        want = dense[e] @ x[s // k].float().double()
        magnitude = dense[e].abs() @ x[s // k].abs()
        assert ((got[s] - want).abs() <= 1e-5 * magnitude + 1e-30).all()
    # One slot per row of x (the down projection's form).
    one = quant_triton.routed_matvec(
        blocks, ggml_type, experts, rows, ids[:n].to(DEVICE), x.float().to(DEVICE), 1
    )
    assert one.shape == (n, rows)


def test_bad_input_is_refused_before_any_launch():
    blocks, _ = weights(T.Q4_K, 2, 256, seed=1)
    with pytest.raises(UnsupportedError, match="no GPU kernel for Q2_K"):
        quant_triton.dequantize(blocks, T.Q2_K, 2, 256)
    with pytest.raises(UnsupportedError, match="not a multiple of 256"):
        quant_triton.matvec(blocks, T.Q4_K, 2, torch.zeros(1, 128, device=DEVICE))
    with pytest.raises(ValueError, match="expected 3 rows"):
        quant_triton.dequantize(blocks, T.Q4_K, 3, 256)
    with pytest.raises(ValueError, match=r"\[tokens, columns\]"):
        quant_triton.matvec(blocks, T.Q4_K, 2, torch.zeros(256, device=DEVICE))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_gather_rows_equals_gguf_rows_bit_for_bit(ggml_type):
    rows, cols = 37, 512
    blocks, dense = weights(ggml_type, rows, cols, seed=5)
    ids = torch.tensor([3, 0, 36, 3, 17, 36, 1, 2, 5, 8, 13, 21, 34, 9, 10, 11, 12, 30])  # two programs
    got = quant_triton.gather_rows(blocks, ggml_type, rows, cols, ids.to(DEVICE)).cpu()
    assert torch.equal(got, dense[ids].float())


def test_gather_rows_gives_zeros_for_ids_outside_the_table():
    rows, cols = 5, 256
    blocks, dense = weights(T.Q4_K, rows, cols, seed=9)
    ids = torch.tensor([-1, 4, 5, 1 << 40])
    got = quant_triton.gather_rows(blocks, T.Q4_K, rows, cols, ids.to(DEVICE)).cpu()
    assert torch.equal(got[1], dense[4].float())
    assert not got[[0, 2, 3]].any()
    empty = quant_triton.gather_rows(blocks, T.Q4_K, rows, cols, ids[:0].to(DEVICE))
    assert empty.shape == (0, cols)
    with pytest.raises(ValueError, match="one-dimensional"):
        quant_triton.gather_rows(blocks, T.Q4_K, rows, cols, ids.view(2, 2).to(DEVICE))
