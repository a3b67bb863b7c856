"""Every C++ dot kernel, in every variant this CPU runs, against the torch reference.

Weights are random blocks (every quant bit random, finite fp16 scales of both
signs). Two bounds, both asserted:
- against tandem.cpu.reference.dot_rows (the same 8-bit activation blocks,
  exact products in float64), each output is within 1e-5 of Σ|w|·|x| of its
  row and token: only float32 rounding of the kernel's sums may differ;
- against the plain product (dequantized weights, unquantized x), each output
  is within Σ|w|·(d/2) of it, d the 8-bit step of x's block: the most that
  rounding the activations can move it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from tandem.cpu import kernels, reference
from tandem.quant.dequant import dequantize_blocks
from tests.cpu.variants import testable_variants as _testable_variants
from tests.random_quant import random_blocks

VARIANTS = _testable_variants()
TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# (rows, blocks per row, tokens): single rows and tokens, odd counts, and a long row.
# With 8 tokens or more, AVX-512 VNNI takes the 16-row tiled kernels (dot_tiled.inc):
# a partial tile of rows, a token remainder, and rows longer than one 1024-column chunk.
# One token over an even number of 32-value blocks takes their 512-bit loops
# (dot_q32_one512.inc), an odd number the 256-bit ones.
SHAPES = [(1, 1, 1), (5, 3, 1), (9, 6, 1), (6, 64, 1), (7, 2, 33), (3, 8, 4), (37, 5, 20), (18, 40, 9)]


FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def weights(ggml_type: T, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Raw blocks: random quant bits, or normal values for the float types (random bits overflow)."""
    if ggml_type in FLOAT_DTYPES:
        values = torch.randn(rows * cols, generator=torch.Generator().manual_seed(seed))
        return values.to(FLOAT_DTYPES[ggml_type]).view(torch.uint8)
    block, _ = GGML_QUANT_SIZES[ggml_type]
    raw = random_blocks(ggml_type, rows * cols // block, seed=seed, max_exponent=0)
    return torch.from_numpy(raw.reshape(-1))


def activations(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    # Groups of 256 columns of very different magnitude, and an all-zero block of 32.
    # (Within one 8-bit block of 256 the spread stays that of a normal sample:
    # an outlier channel costs the small ones their precision, as in every
    # 8-bit activation scheme, and would only test the scheme.)
    groups = (k + 255) // 256
    scale = torch.exp2(torch.randint(-6, 6, (n, groups), generator=g).float())
    x *= scale.repeat_interleave(256, 1)[:, :k]
    if k > 32:
        x[0, :32] = 0.0
    return x


def test_every_required_type_has_a_kernel_in_every_variant():
    for variant in VARIANTS:
        assert set(TYPES) <= set(kernels.kernel_types(variant)), variant


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,n_blocks,n_tok", SHAPES)
def test_kernel_matches_reference(variant, ggml_type, rows, n_blocks, n_tok):
    block = max(GGML_QUANT_SIZES[ggml_type][0], 32)  # float types: whole blocks of 32 columns
    cols = n_blocks * block
    seed = rows * 1000 + n_blocks * 10 + n_tok
    w = weights(ggml_type, rows, cols, seed)
    x = activations(n_tok, cols, seed + 1)
    fmt = kernels.act_format(variant, ggml_type)

    out = kernels.dot_rows(variant, w, ggml_type, rows, x)  # [n, rows]
    exact = reference.dot_rows(w, ggml_type, rows, x, fmt)
    dense = dequantize_blocks(w.reshape(-1, GGML_QUANT_SIZES[ggml_type][1]), ggml_type).reshape(rows, cols)
    magnitude = reference.prepared_activations(x, fmt).abs() @ dense.double().abs().T
    assert torch.isfinite(out).all()
    assert ((out.double() - exact).abs() <= 1e-5 * magnitude + 1e-30).all()

    # Rounding x to 8 bits moves each element by at most half a step (d / 2).
    plain = x.double() @ dense.double().T
    half_step = torch.zeros_like(x, dtype=torch.float64)
    if fmt != reference.ACT_F32:
        block = reference.ACT_BLOCK[fmt]
        d, _ = reference.quantize_activations(x, block)
        half_step = (d.double() / 2).repeat_interleave(block, 1)
    bound = half_step @ dense.double().abs().T + 1e-5 * magnitude
    assert ((out.double() - plain).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block", [32, 256])
def test_activation_blocks_equal_the_reference_bit_for_bit(variant, block):
    x = activations(9, 4 * 256, 5)
    x[1, 7] = 0.5 * x[1].abs().max()  # exact halves exercise round-half-even
    d, q, sums = kernels.quantize_activations(variant, x, block)
    d_ref, q_ref = reference.quantize_activations(x, block)
    assert torch.equal(d, d_ref)
    assert torch.equal(q, q_ref)
    group = 32 if block == 32 else 16
    assert torch.equal(sums, q_ref.int().reshape(9, -1, group).sum(-1))
    assert q.abs().max() <= 127


def test_variants_give_the_same_integer_results():
    # Quantized kernels sum integers exactly, so variants may differ only by float rounding.
    rows, cols = 16, 512
    w = weights(T.Q4_K, rows, cols, 3)
    x = activations(3, cols, 4)
    outs = [kernels.dot_rows(v, w, T.Q4_K, rows, x) for v in VARIANTS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("amx" not in VARIANTS, reason="needs a CPU with AMX")
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [16, 33, 64])
def test_amx_tiles_equal_the_vnni_tiles_bit_for_bit(ggml_type, n_tok):
    # The amx variant makes the tiled kernels' integer sums on AMX-INT8 tiles (dot_amx_kq.inc),
    # then takes the avx512 variant's float steps in the same order, wherever both take tiles
    # (from 10 tokens, Q6_K's from 14; below, one side may take the per-row kernels, whose
    # float sums run in another order). 37 rows: a partial row tile; 1280 columns: five super-blocks; 33 tokens:
    # a partial group of 16.
    w = weights(ggml_type, 37, 1280, seed=n_tok)
    x = activations(n_tok, 1280, seed=n_tok + 1)
    amx = kernels.dot_rows("amx", w, ggml_type, 37, x)
    assert torch.equal(amx, kernels.dot_rows("avx512", w, ggml_type, 37, x))
    assert amx.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [0, 7, 32, 1000, 4096 + 37])
def test_the_bandwidth_read_loop_sums_every_word(variant, n):
    from tandem import _cpu

    raw = np.random.default_rng(n).integers(0, 256, n + 3, dtype=np.uint8)
    buf = torch.from_numpy(raw[3:].copy())  # an address off every alignment
    whole = n // 8 * 8
    want = int(raw[3 : 3 + whole].view(np.uint64).sum(dtype=np.uint64)) + int(raw[3 + whole :].sum())
    assert _cpu.read_words(variant, buf.data_ptr(), n) == want % (1 << 64)


def test_the_amx_table_is_refused_where_amx_cannot_run():
    if "amx" in VARIANTS or "amx" not in kernels.variants_built():
        pytest.skip("AMX runs here, or the amx variant is not built")
    w = weights(T.Q4_K, 1, 256, 0)
    with pytest.raises(ValueError, match="needs AMX tiles"):
        kernels.dot_rows("amx", w, T.Q4_K, 1, torch.zeros(16, 256))


def test_unsupported_type_is_refused_before_any_work():
    w = torch.zeros(GGML_QUANT_SIZES[T.IQ4_XS][1], dtype=torch.uint8)
    with pytest.raises(ValueError, match="no kernel for ggml type"):
        kernels.dot_rows(VARIANTS[0], w, T.IQ4_XS, 1, torch.zeros(1, 256))
    np.testing.assert_equal(w.numpy(), 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_silu_mul_matches_torch(variant):
    from tandem import _cpu

    # Both signs up to where e^-g leaves float range, zeros, tiny values, and a length
    # that is no multiple of any vector width.
    g = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.5, -88.5])])
    u = torch.randn(g.numel(), generator=torch.Generator().manual_seed(0))
    exact = torch.nn.functional.silu(g.double()) * u.double()
    out = g.clone()
    _cpu.silu_mul(variant, out.data_ptr(), u.data_ptr(), g.numel())
    assert ((out.double() - exact).abs() <= 1e-6 * exact.abs() + 1e-30).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [1, 7, 16, 37, 2048])  # the vector loops, their tails, and both
def test_add_scaled_matches_float64(variant, n):
    from tandem import _cpu

    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    a = -0.37
    exact = y.double() + a * x.double()
    out = y.clone()
    _cpu.add_scaled(variant, a, x.data_ptr(), n, out.data_ptr())
    # One rounding (a fused multiply-add) or two (a product, then a sum): within 2 ulps.
    assert ((out.double() - exact).abs() <= 2 * 2.0**-24 * (exact.abs() + abs(a) * x.double().abs())).all()
    assert not torch.equal(out, y)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows,n", [(1, 2048), (3, 128), (5, 13), (200, 640)])  # 200 rows: on the pool
def test_rms_norm_matches_float64(variant, rows, n):
    from tandem import _cpu

    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, n, generator=g) * torch.exp2(torch.randint(-8, 8, (rows, 1), generator=g).float())
    w = torch.randn(n, generator=g)
    out = torch.empty_like(x)
    pool = _cpu.ThreadPool(2, False)
    _cpu.rms_norm(pool, variant, x.data_ptr(), w.data_ptr(), rows, n, 1e-6, out.data_ptr())
    xd = x.double()
    exact = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert ((out.double() - exact).abs() <= 1e-6 * exact.abs() + 1e-12).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_gelu_tanh_mul_matches_torch(variant):
    from tandem import _cpu

    # The tanh-approximated GELU (Gemma's), through both tails, zeros and odd lengths.
    g = torch.cat([torch.linspace(-30, 30, 20001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0])])
    u = torch.randn(g.numel(), generator=torch.Generator().manual_seed(1))
    x = g.double()
    # 0.5 x (1 + tanh y) = x sigmoid(2y), exactly; the sigmoid form keeps the far negative
    # tail (about 1e-30 at x = -9) that 1 + tanh y rounds to zero even in float64.
    exact = x * torch.sigmoid(2 * 0.7978845608028654 * (x + 0.044715 * x**3)) * u.double()
    torch_tanh_form = torch.nn.functional.gelu(x, approximate="tanh") * u.double()
    middle = x.abs() < 4  # where torch's tanh form has not yet cancelled
    assert ((exact - torch_tanh_form)[middle].abs() <= 1e-10 * exact[middle].abs()).all()
    out = g.clone()
    _cpu.gelu_tanh_mul(variant, out.data_ptr(), u.data_ptr(), g.numel())
    # float32 throughout: within 2e-6 for |x| < 4, where the activations live; beyond, the
    # negative tail (values below 1e-5) inherits the float32 rounding of the exponent's
    # argument, which grows like x^3.
    tol = torch.where(x.abs() < 4, 2e-6, 1e-4) * exact.abs() + 1e-35  # e^x is clamped near 2^127
    assert ((out.double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name
)
def test_one_token_rows_in_any_number_of_streams_give_the_same_results(variant, ggml_type):
    # The one-token loops walk their rows in 1-8 streams side by side (row_streams.inc), each
    # row with its own accumulator: bit-identical results, whatever the streams and whether a
    # row has partners (row counts below, equal to and past the streams, with short last parts).
    from tandem.cpu.engine import MAX_DECODE_STREAMS, _native

    before = _native().decode_streams()
    try:
        for rows in (1, 2, 3, 5, 7, 13, 64):
            w = weights(ggml_type, rows, 3 * 256, seed=rows)
            x = activations(1, 3 * 256, seed=rows + 1)
            outs = []
            for streams in range(1, MAX_DECODE_STREAMS + 1):
                _native().set_decode_streams(streams)
                outs.append(kernels.dot_rows(variant, w, ggml_type, rows, x))
            exact = reference.dot_rows(w, ggml_type, rows, x, kernels.act_format(variant, ggml_type))
            assert ((outs[0].double() - exact).abs() <= 1e-4 * exact.abs().max()).all()
            for out in outs[1:]:
                assert torch.equal(out, outs[0]), (rows, variant)
        with pytest.raises(ValueError, match="1 to 8"):
            _native().set_decode_streams(MAX_DECODE_STREAMS + 1)
    finally:
        _native().set_decode_streams(before)
