"""tandem's torch dequantization is bit-exact with gguf's numpy reference.

Blocks are random bytes, so every code (nibble, 2-bit plane, high bit, 6-bit
scale) takes every value; only the float16 scale fields are overwritten with
finite random values, because a NaN or Inf there would make the comparison
meaningless.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from tandem.errors import UnsupportedError
from tandem.quant import dequant
from tandem.quant.dequant import SUPPORTED_TYPES, dequantize, dequantize_blocks
from tandem.quant.quant_tensor import QuantTensor
from tests.random_quant import REQUIRED, SCALE_FIELDS, random_blocks


def reference(raw: np.ndarray, ggml_type: T) -> torch.Tensor:
    """gguf's dequantization of uint8 [rows, row_bytes], as float32 [rows, row_len]."""
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, ggml_type), dtype=np.float32))


def assert_bit_exact(ours: torch.Tensor, ref: torch.Tensor) -> None:
    # A NaN in the reference would make torch.equal fail for the wrong reason, or
    # signal that the scale fields were not overwritten where the test thinks.
    assert not torch.isnan(ref).any()
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)
    # Equal floats can still differ in the sign of zero; bit patterns cannot.
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


def quant_tensor(ggml_type: T, shape: tuple[int, ...], seed: int = 0) -> tuple[QuantTensor, torch.Tensor]:
    """A QuantTensor of random blocks and gguf's dequantization of it, shaped `shape`."""
    block_size, _ = GGML_QUANT_SIZES[ggml_type]
    n_rows = int(np.prod(shape[:-1]))
    raw = random_blocks(ggml_type, n_rows * shape[-1] // block_size, seed)
    ref = reference(raw.reshape(n_rows, -1), ggml_type).reshape(shape)
    qt = QuantTensor(torch.from_numpy(raw.reshape(-1)), ggml_type, shape, "blk.0.test.weight")
    return qt, ref


def test_every_required_type_is_supported():
    assert set(REQUIRED) <= SUPPORTED_TYPES


@pytest.mark.parametrize("ggml_type", SCALE_FIELDS, ids=lambda t: t.name)
def test_random_blocks_hold_every_byte_value_outside_the_scales(ggml_type):
    # Guards the claim that the comparison covers every bit pattern of the codes.
    raw = random_blocks(ggml_type, 300)
    keep = np.ones(raw.shape[1], dtype=bool)
    for offset in SCALE_FIELDS[ggml_type]:
        keep[offset : offset + 2] = False
    assert len(np.unique(raw[:, keep])) == 256


@pytest.mark.parametrize("n_blocks", [1, 7, 300])
@pytest.mark.parametrize("ggml_type", REQUIRED, ids=lambda t: t.name)
def test_blocks_match_gguf(ggml_type, n_blocks):
    raw = random_blocks(ggml_type, n_blocks, seed=n_blocks)
    ours = dequantize_blocks(torch.from_numpy(raw), ggml_type)
    block_size, _ = GGML_QUANT_SIZES[ggml_type]
    assert_bit_exact(ours, reference(raw, ggml_type).reshape(n_blocks, block_size))


@pytest.mark.parametrize("shape", [(5, 512), (2, 3, 768)])
@pytest.mark.parametrize("ggml_type", REQUIRED, ids=lambda t: t.name)
def test_quant_tensor_matches_gguf(ggml_type, shape):
    qt, ref = quant_tensor(ggml_type, shape, seed=len(shape))
    assert_bit_exact(qt.dequantize(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ggml_type", REQUIRED, ids=lambda t: t.name)
def test_many_chunks_with_a_remainder(ggml_type, dtype, monkeypatch):
    # 1000 values per chunk: 3 super-blocks, 31 small blocks or 1000 floats, so
    # the 9 x 768 tensor spans many chunks and ends in a partial one.
    monkeypatch.setattr(dequant, "CHUNK_VALUES", 1000)
    qt, ref = quant_tensor(ggml_type, (9, 768), seed=3)
    ours = dequantize(qt, dtype)
    assert ours.dtype == dtype
    if dtype == torch.float32:
        assert_bit_exact(ours, ref)
    else:
        assert torch.equal(ours.view(torch.int16), ref.to(dtype).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_output_dtype_is_the_rounded_float32_result(ggml_type, dtype):
    qt, ref = quant_tensor(ggml_type, (4, 512))
    ours = qt.dequantize(dtype)
    assert ours.dtype == dtype
    assert ours.shape == (4, 512)
    expected = ref.to(dtype)
    assert torch.equal(ours, expected)
    # torch.equal ignores the sign of zero; the raw bits do not.
    int_type = {2: torch.int16, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(ours.view(int_type), expected.view(int_type))


def test_non_float_dtype_is_rejected():
    qt, _ = quant_tensor(T.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="floating-point"):
        dequantize(qt, torch.int32)


@pytest.mark.parametrize("ggml_type", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_data_at_an_odd_address(ggml_type):
    # A tensor view into an mmapped file need not be aligned to its element size.
    raw = random_blocks(ggml_type, 64)
    padded = torch.from_numpy(np.concatenate([np.zeros(1, np.uint8), raw.reshape(-1)]))
    qt = QuantTensor(padded[1:], ggml_type, (4, 16))
    assert qt.data.storage_offset() == 1
    assert_bit_exact(qt.dequantize(), reference(raw.reshape(4, -1), ggml_type))


@pytest.mark.parametrize("ggml_type", [T.F32, T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_blocks_that_are_a_strided_view(ggml_type):
    raw = random_blocks(ggml_type, 20)
    wide = torch.zeros(20, raw.shape[1] + 3, dtype=torch.uint8)
    wide[:, 1 : 1 + raw.shape[1]] = torch.from_numpy(raw)
    blocks = wide[:, 1 : 1 + raw.shape[1]]
    assert not blocks.is_contiguous()
    assert_bit_exact(dequantize_blocks(blocks, ggml_type), reference(raw, ggml_type).reshape(20, -1))


def test_output_is_a_copy_not_a_view_of_the_data():
    qt, _ = quant_tensor(T.F32, (4, 64))
    before = qt.data.clone()
    qt.dequantize().fill_(1.0)
    assert torch.equal(qt.data, before)


def test_unsupported_type_names_tensor_and_type():
    block_size, type_size = GGML_QUANT_SIZES[T.IQ2_XXS]
    data = torch.zeros(2 * type_size, dtype=torch.uint8)
    qt = QuantTensor(data, T.IQ2_XXS, (2, block_size), "blk.0.ffn_up.weight")
    with pytest.raises(UnsupportedError) as error:
        qt.dequantize()
    message = str(error.value)
    assert "'blk.0.ffn_up.weight'" in message
    assert "IQ2_XXS" in message
    assert "Q4_K" in message  # the supported types are listed


def test_unsupported_type_of_raw_blocks():
    _, type_size = GGML_QUANT_SIZES[T.IQ3_S]
    with pytest.raises(UnsupportedError, match="IQ3_S"):
        dequantize_blocks(torch.zeros(1, type_size, dtype=torch.uint8), T.IQ3_S)


def test_blocks_of_the_wrong_size_are_rejected():
    with pytest.raises(ValueError, match=r"Q4_K blocks must be uint8 \[n_blocks, 144\]"):
        dequantize_blocks(torch.zeros(2, 143, dtype=torch.uint8), T.Q4_K)
