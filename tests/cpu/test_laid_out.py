"""The kernels' laid-out tokens (LaidOutKernel, the amx variant's Q4_K, Q5_K and Q6_K) and the ops on them.

A token's outputs depend only on its own activations, so every bound here is
bit-for-bit equality:
- the laid-out path equals one dot_rows call over all the tokens, for any split
  into token tiles;
- the linear op on laid-out tokens equals one dot_rows call;
- the experts op of the amx variant equals the avx512 variant's, with every
  expert's tokens (and every 64-token tile of the avx512 path) taking the tiled
  kernels on both sides, whose integer sums and float steps the AMX kernel repeats.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from tandem.cpu import kernels
from tandem.cpu.engine import CPUEngine
from tandem.quant.quant_tensor import QuantTensor
from tandem.synth.random_blocks import random_blocks
from tests.cpu.variants import testable_variants as _testable_variants

VARIANTS = _testable_variants()
needs_amx = pytest.mark.skipif("amx" not in VARIANTS, reason="needs a CPU with AMX")


def quant(ggml_type: T, shape: tuple[int, ...], seed: int) -> QuantTensor:
    block, _ = GGML_QUANT_SIZES[ggml_type]
    numel = int(np.prod(shape))
    data = torch.from_numpy(random_blocks(ggml_type, numel // block, np.random.default_rng(seed)).reshape(-1))
    return QuantTensor(data, ggml_type, shape, "blk.0.test.weight")


def laid_out(variant: str, w: QuantTensor, rows: int, x: torch.Tensor, tok_tile: int) -> torch.Tensor:
    from tandem import _cpu

    n, k = x.shape
    out = torch.empty(n, rows)
    args = (int(w.ggml_type), w.data.data_ptr(), rows, k, x.data_ptr(), n, tok_tile, out.data_ptr())
    _cpu.dot_rows_laid_out(variant, *args)
    return out


@needs_amx
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [12, 17, 33, 300])
@pytest.mark.parametrize("tok_tile", [16, 48, 256])
def test_laid_out_tokens_equal_dot_rows_bit_for_bit(ggml_type, n_tok, tok_tile):
    # 37 rows: a partial row tile; 1280 columns: five super-blocks; odd token counts: partial groups.
    w = quant(ggml_type, (37, 1280), seed=n_tok)
    x = torch.randn(n_tok, 1280, generator=torch.Generator().manual_seed(n_tok))
    out = laid_out("amx", w, 37, x, tok_tile)
    assert torch.equal(out, kernels.dot_rows("amx", w.data, ggml_type, 37, x))
    assert out.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_kernels_with_a_laid_out_path_offer_it(variant):
    w = quant(T.Q8_0, (16, 256), seed=0)
    with pytest.raises(ValueError, match="no laid-out kernel"):
        laid_out(variant, w, 16, torch.zeros(16, 256), 16)
    if variant != "amx":  # the AMX tiles are the only laid-out kernels
        with pytest.raises(ValueError, match="no laid-out kernel"):
            laid_out(variant, quant(T.Q4_K, (16, 256), seed=0), 16, torch.zeros(16, 256), 16)


@needs_amx
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [37, 300])
@pytest.mark.parametrize("n_tok", [8, 17, 300, 600])
def test_the_linear_op_on_laid_out_tokens_equals_one_dot_rows_call(ggml_type, rows, n_tok):
    w = quant(ggml_type, (rows, 2304), seed=rows + n_tok)
    x = torch.randn(n_tok, 2304, generator=torch.Generator().manual_seed(n_tok))
    want = kernels.dot_rows("amx", w.data, ggml_type, rows, x)
    for threads in (1, 3):
        out = CPUEngine(threads=threads, variant="amx", prefill="off").linear(w)(x)
        assert torch.equal(out, want)


@needs_amx
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q6_K), (T.Q5_K, T.Q4_K), (T.Q4_K, T.Q5_K)], ids=str)
def test_experts_on_laid_out_tokens_equal_the_avx512_variant(types):
    gate_type, down_type = types
    n_experts, hidden, inter = 8, 512, 768
    # Assignments per expert: below the AMX thresholds of 8 and 12 (dot_rows on both sides),
    # one or more groups of 16 and partial groups, and more than one 64-token tile on the
    # avx512 side, none of which leaves it fewer than 14 tokens (Q6_K's VNNI-tile threshold).
    counts = [0, 3, 7, 14, 17, 40, 100, 150]
    dropped = [n_experts]  # makes the slot count even
    slots = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)] + dropped)
    slots = slots[torch.randperm(len(slots), generator=torch.Generator().manual_seed(0))]
    ids = slots.reshape(-1, 2)
    n_tok = ids.shape[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_tok, hidden, generator=g)
    weights = torch.rand(n_tok, 2, generator=g)
    gate = quant(gate_type, (n_experts, inter, hidden), seed=2)
    up = quant(gate_type, (n_experts, inter, hidden), seed=3)
    down = quant(down_type, (n_experts, hidden, inter), seed=4)

    def experts(variant: str, threads: int) -> torch.Tensor:
        engine = CPUEngine(threads=threads, variant=variant, prefill="off")
        return engine.experts(gate, up, down)(x, ids, weights)

    want = experts("avx512", 3)
    for threads in (1, 3):
        assert torch.equal(experts("amx", threads), want)
    assert torch.isfinite(want).all() and want.abs().sum() > 0
