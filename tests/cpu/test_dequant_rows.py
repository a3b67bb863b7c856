"""The engine's row dequantization (the token embedding's lookup) against gguf's numpy reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from tandem.cpu.engine import dequantize_rows
from tandem.quant.quant_tensor import QuantTensor
from tests.random_quant import random_blocks

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ROWS, COLS = 5, 512


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_rows_equal_the_gguf_reference(ggml_type):
    block, size = GGML_QUANT_SIZES[ggml_type]
    raw = random_blocks(ggml_type, ROWS * COLS // block, seed=int(ggml_type)).reshape(
        ROWS, COLS // block * size
    )
    weight = QuantTensor(
        torch.from_numpy(raw.reshape(-1).copy()), ggml_type, (ROWS, COLS), "token_embd.weight"
    )
    ids = torch.tensor([3, 0, 3, 4])
    got = dequantize_rows(weight, ids)
    ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, ggml_type), dtype=np.float32))[
        ids
    ]
    assert got is not None and got.shape == (4, COLS)
    assert not torch.isnan(ref).any()
    # Exactly equal values; a zero's sign may differ (d * 0 against gguf's 0 * d with d < 0).
    assert torch.equal(got, ref)


def test_types_without_a_kernel_give_none():
    raw = random_blocks(T.IQ4_XS, 2, seed=1)
    weight = QuantTensor(torch.from_numpy(raw.reshape(-1).copy()), T.IQ4_XS, (1, 512), "token_embd.weight")
    assert dequantize_rows(weight, torch.tensor([0])) is None
