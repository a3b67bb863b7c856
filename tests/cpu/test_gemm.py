"""The prefill kernels (bf16 tiles: AMX or AVX512-BF16) and the ops' prefill path.

Bounds (asserted):
- each kernel output within 1e-5 of Σ|w|·|x| of the product of the bf16-rounded
  dequantized weights and bf16-rounded activations (tandem.cpu.reference.gemm_rows),
  and within 2^-8 of Σ|w|·|x| of the plain float product: the most that rounding
  both operands to bf16 can move it;
- the linear op on the prefill path: the same two bounds;
- by default, Q4_K, Q5_K and Q6_K stay on the dot kernels' AMX-INT8 tiles where the amx
  kernels have them, at any token count (the op's output equals dot_rows bit for bit),
  and other types still take the prefill path;
- the MoE op with some experts on the prefill path and some on the dot kernels:
  relative L2 error below 5e-4 against a float64 reference taking the same path
  per expert, below 3e-2 against the float32 torch arithmetic, and identical
  results for every thread count.
Only the kernel sets this CPU runs are tested; the GPU machine's Xeon runs amx.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from tandem.cpu import kernels, reference
from tandem.cpu.engine import CPUEngine
from tandem.cpu.features import PREFILL_REQUIRES, cpu_features, select_prefill
from tandem.errors import TandemError
from tandem.quant.dequant import dequantize_blocks
from tandem.quant.quant_tensor import block_layout
from tests.cpu.moe_reference import experts_exact
from tests.cpu.test_engine_ops import expert_set, plain_experts, rel, routing
from tests.cpu.test_kernels import activations, weights

FEATURES = cpu_features()
PREFILL = [
    name
    for name in kernels.prefill_kernels_built()
    if all(FEATURES.get(f, False) for f in PREFILL_REQUIRES[name])
]
needs_prefill = pytest.mark.skipif(not PREFILL, reason="this CPU runs no prefill kernels")
TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
# (rows, cols, tokens): partial row tiles and token groups, one token, exact tiles.
SHAPES = [(45, 512, 37), (7, 256, 1), (64, 768, 64), (33, 32, 17)]
FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def dequantized(blocks: torch.Tensor, ggml_type: T, rows: int) -> torch.Tensor:
    if ggml_type in FLOAT_DTYPES:
        return blocks.view(FLOAT_DTYPES[ggml_type]).double().reshape(rows, -1)
    _, type_size = block_layout(ggml_type)
    return dequantize_blocks(blocks.reshape(-1, type_size), ggml_type).double().reshape(rows, -1)


def assert_within_bf16_bounds(out, blocks, ggml_type, rows, x):
    w = dequantized(blocks, ggml_type, rows)
    scale = x.double().abs() @ w.abs().T  # Σ|w||x| per output
    exact = reference.gemm_rows(blocks, ggml_type, rows, x)
    assert ((out.double() - exact).abs() <= 1e-5 * scale + 1e-30).all()
    plain = x.double() @ w.T
    assert ((out.double() - plain).abs() <= 2.0**-8 * scale * 1.001 + 1e-30).all()
    assert out.abs().sum() > 0


@needs_prefill
@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n", SHAPES)
def test_kernel_matches_the_reference(name, ggml_type, rows, cols, n):
    if cols % block_layout(ggml_type)[0]:
        pytest.skip("row shorter than the type's block")
    blocks = weights(ggml_type, rows, cols, seed=rows + n)
    x = activations(n, cols, seed=cols + n)
    out = kernels.gemm_rows(name, blocks, ggml_type, rows, x)
    assert_within_bf16_bounds(out, blocks, ggml_type, rows, x)


@needs_prefill
@pytest.mark.parametrize("name", PREFILL)
def test_kernel_refuses_rows_not_a_multiple_of_32(name):
    blocks = weights(T.F32, 3, 48, seed=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.gemm_rows(name, blocks, T.F32, 3, torch.randn(2, 48))


def prefill_engine(name: str, threads: int, min_tokens: int) -> CPUEngine:
    # Every type on the prefill path from min_tokens on, the AMX-INT8 ones too.
    return CPUEngine(threads=threads, prefill=name, gemm_min_tokens=min_tokens, gemm_int8_first=False)


def assert_exact_8_bit(out, blocks, ggml_type, rows, x, engine):
    exact = reference.dot_rows(blocks, ggml_type, rows, x, kernels.act_format(engine.kernels, ggml_type))
    scale = x.double().abs() @ dequantized(blocks, ggml_type, rows).abs().T
    assert ((out.double() - exact).abs() <= 1e-5 * scale + 1e-30).all()


@needs_prefill
@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("n", [40, 130])
# (rows, cols, threads): one tile per task; and row blocks of two tiles (the last one partial)
# against token blocks of 32 (cols 4096), the last one of 2 tokens.
@pytest.mark.parametrize("rows,cols,threads", [(100, 512, 3), (300, 4096, 1)])
def test_linear_op_takes_the_prefill_path_from_its_threshold(name, ggml_type, n, rows, cols, threads):
    from tandem.quant.quant_tensor import QuantTensor

    blocks = weights(ggml_type, rows, cols, seed=n)
    x = activations(n, cols, seed=n + 1)
    engine = prefill_engine(name, threads=threads, min_tokens=32)
    linear = engine.linear(QuantTensor(blocks, ggml_type, (rows, cols), "blk.0.w"))
    assert_within_bf16_bounds(linear(x), blocks, ggml_type, rows, x)
    # Below the threshold the same op takes the 8-bit dot kernels: their exact reference holds.
    assert_exact_8_bit(linear(x[:5]), blocks, ggml_type, rows, x[:5], engine)


@needs_prefill
@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_int8_tile_types_keep_the_dot_kernels_by_default(name, ggml_type):
    from tandem.quant.quant_tensor import QuantTensor

    rows, cols, n = 70, 512, 150
    blocks = weights(ggml_type, rows, cols, seed=3)
    x = activations(n, cols, seed=4)
    engine = CPUEngine(threads=2, prefill=name, gemm_min_tokens=32)
    assert engine.gemm_int8_first
    out = engine.linear(QuantTensor(blocks, ggml_type, (rows, cols), "blk.0.w"))(x)
    if engine.kernels == "amx" and ggml_type != T.Q8_0:  # its AMX-INT8 tiles: dot_rows bit for bit
        assert torch.equal(out, kernels.dot_rows(engine.kernels, blocks, ggml_type, rows, x))
    else:
        assert_within_bf16_bounds(out, blocks, ggml_type, rows, x)


def experts_mixed(engine: CPUEngine, gate, up, down, x, ids, weights) -> torch.Tensor:
    """float64 reference: experts with at least gemm_min_tokens tokens in bf16, the others in 8 bits."""
    counts = torch.bincount(ids.reshape(-1), minlength=gate.shape[0] + 1)
    wg, wu, wd = (qt.dequantize(torch.float32).double() for qt in (gate, up, down))
    out = torch.zeros(x.shape, dtype=torch.float64)
    dot_part = ids.clone()
    for e in range(gate.shape[0]):
        token, slot = (ids == e).nonzero(as_tuple=True)
        if token.numel() == 0 or counts[e] < engine.gemm_min_tokens:
            continue
        dot_part[token, slot] = gate.shape[0]  # dropped from the 8-bit reference below
        xb = reference.to_bf16(x[token])
        g = xb @ reference.to_bf16(wg[e]).T
        u = xb @ reference.to_bf16(wu[e]).T
        h = torch.nn.functional.silu(g.float()) * u.float()
        y = reference.to_bf16(h) @ reference.to_bf16(wd[e]).T
        out.index_add_(0, token, weights[token, slot].double()[:, None] * y)
    return out + experts_exact(engine.kernels, gate, up, down, x, dot_part, weights)


@needs_prefill
@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0), (T.Q5_K, T.Q4_0)], ids=str)
@pytest.mark.parametrize("n,k,skew", [(40, 2, "one"), (130, 3, "random"), (200, 2, "half")])
def test_experts_mix_the_prefill_path_and_the_dot_kernels(name, types, n, k, skew):
    gate, up, down = expert_set(types)
    x, ids, weights = routing(n, k, seed=n, skew=skew)
    engine = prefill_engine(name, threads=2, min_tokens=33)
    counts = torch.bincount(ids.reshape(-1))
    assert (counts >= 33).any()  # the shapes above put some experts on each path
    out = engine.experts(gate, up, down)(x, ids, weights)
    assert rel(out, experts_mixed(engine, gate, up, down, x, ids, weights)) < 5e-4
    assert rel(out, plain_experts(gate, up, down, x, ids, weights)) < 3e-2


@needs_prefill
@pytest.mark.parametrize("name", PREFILL)
def test_experts_on_the_prefill_path_are_identical_for_every_thread_count(name):
    gate, up, down = expert_set((T.Q4_K, T.Q6_K), seed=4)
    x, ids, weights = routing(300, 4, seed=9)
    outs = [prefill_engine(name, t, 16).experts(gate, up, down)(x, ids, weights) for t in (1, 2, 3, 4)]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_prefill_selection():
    amx = {f: True for f in PREFILL_REQUIRES["amx"]}
    assert select_prefill("amx", amx, override=None) == "amx"
    assert select_prefill("avx512", amx, override=None) == ""  # a forced lower variant: dot kernels only
    assert select_prefill("amx", amx, override="off") == ""
    assert select_prefill("avx512", amx, override="avx512bf16") == "avx512bf16"
    zen4 = {f: True for f in PREFILL_REQUIRES["avx512bf16"]}
    assert select_prefill("avx512", zen4, override=None) == ""  # opt-in there
    with pytest.raises(TandemError, match="lacks amx"):
        select_prefill("avx512", zen4, override="amx")
    with pytest.raises(TandemError, match="not a prefill kernel set"):
        select_prefill("avx512", zen4, override="tiles")
