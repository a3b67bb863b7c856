"""GGUF blocks on the GPU in Triton: dequantization, and products with a few tokens.

Each kernel reads a weight matrix as the GGUF file stores it (rows of blocks, a
row's bytes contiguous) and turns one chunk of columns of BN rows into float32 in
registers: 256 columns (one super-block) for the K-quants, 32 (one block) for Q8_0.
`dequantize` writes those values out (a dense copy, e.g. bf16 once at load);
`gather_rows` writes only the rows a batch of ids names (a token table's lookup);
`matvec` multiplies them with each token's activations without writing them, the
decode path for weights kept quantized. The float arithmetic is the `gguf`
package's, in its order, with contraction into FMA turned off: dequantized values
equal `gguf.quants.dequantize` bit for bit (tests/gpu/test_quant_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from tandem.errors import UnsupportedError
from tandem.quant.quant_tensor import block_layout

T = GGMLQuantizationType

# Kernel type codes, and the columns one chunk covers.
_CODE = {T.Q8_0: 0, T.Q4_K: 1, T.Q5_K: 2, T.Q6_K: 3}
_CHUNK = {T.Q8_0: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256}
SUPPORTED_TYPES = frozenset(_CODE)
ROWS_PER_PROGRAM = 16


@triton.jit
def _fp16(p, mask):
    """The little-endian fp16 at byte addresses p, as float32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kq_scales_mins(s, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-blocks 0..7 from the 12 bytes at s ([BN, 1])."""
    j = tl.arange(0, 8)[None, :]
    low = j < 4
    sj = tl.load(s + j, mask=mask, other=0).to(tl.int32)
    sj4 = tl.load(s + j + 4, mask=mask, other=0).to(tl.int32)
    sjm4 = tl.load(s + tl.maximum(j - 4, 0), mask=mask, other=0).to(tl.int32)
    sc = tl.where(low, sj & 63, (sj4 & 15) | ((sjm4 >> 6) << 4))
    m = tl.where(low, sj4 & 63, (sj4 >> 4) | ((sj >> 6) << 4))
    return sc, m


@triton.jit
def _tile_kq(base, mask, FIVE_BITS: tl.constexpr, BN: tl.constexpr):
    """Q4_K (144 bytes) or Q5_K (176): one super-block of BN rows as float32 [BN, 256]."""
    d = _fp16(base, mask)
    dmin = _fp16(base + 2, mask)
    sc, m = _kq_scales_mins(base + 4, mask)
    j = tl.arange(0, 8)[None, :, None]
    i = tl.arange(0, 32)[None, None, :]
    b3 = base[:, :, None]
    m3 = mask[:, :, None]
    qs = 48 if FIVE_BITS else 16
    byte = tl.load(b3 + qs + 32 * (j // 2) + i, mask=m3, other=0).to(tl.int32)
    q = (byte >> (4 * (j % 2))) & 15
    if FIVE_BITS:
        high = tl.load(b3 + 16 + i, mask=m3, other=0).to(tl.int32)
        q = q | (((high >> j) & 1) << 4)
    dl = d * sc.to(tl.float32)
    ml = dmin * m.to(tl.float32)
    y = dl[:, :, None] * q.to(tl.float32) - ml[:, :, None]
    return tl.reshape(y, (BN, 256))


@triton.jit
def _tile_q6_k(base, mask, BN: tl.constexpr):
    """Q6_K (210 bytes): one super-block of BN rows as float32 [BN, 256]."""
    g = tl.arange(0, 8)[None, :, None]  # 32-column group: half g // 4, quarter g % 4
    col = tl.arange(0, 32)[None, None, :]
    b3 = base[:, :, None]
    m3 = mask[:, :, None]
    half = g // 4
    quarter = g % 4
    low = tl.load(b3 + 64 * half + 32 * (quarter % 2) + col, mask=m3, other=0).to(tl.int32)
    low = (low >> (4 * (quarter // 2))) & 15
    high = tl.load(b3 + 128 + 32 * half + col, mask=m3, other=0).to(tl.int32)
    high = (high >> (2 * quarter)) & 3
    q = (low | (high << 4)) - 32
    s = tl.arange(0, 16)[None, :]
    scale = tl.load(base + 192 + s, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    dl = tl.reshape(_fp16(base + 208, mask) * scale, (BN, 16, 1))  # per 16 columns
    y = tl.reshape(q.to(tl.float32), (BN, 16, 16)) * dl
    return tl.reshape(y, (BN, 256))


@triton.jit
def _tile_q8_0(base, mask):
    """Q8_0 (34 bytes): one block of BN rows as float32 [BN, 32]."""
    c = tl.arange(0, 32)[None, :]
    q = tl.load(base + 2 + c, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return _fp16(base, mask) * q


@triton.jit
def _tile(w, row_bytes, rows, mask, chunk, TYPE: tl.constexpr, BN: tl.constexpr):
    """Chunk `chunk` of rows `rows` ([BN, 1]) of the matrix at w, as float32 [BN, CHUNK]."""
    if TYPE == 0:
        return _tile_q8_0(w + rows * row_bytes + chunk * 34, mask)
    elif TYPE == 1:
        return _tile_kq(w + rows * row_bytes + chunk * 144, mask, False, BN)
    elif TYPE == 2:
        return _tile_kq(w + rows * row_bytes + chunk * 176, mask, True, BN)
    else:
        return _tile_q6_k(w + rows * row_bytes + chunk * 210, mask, BN)


@triton.jit
def _bf16_bits(y):
    """float32 (finite) to bf16 bits, rounding to nearest even, spelled out: the same on
    every backend, Triton's interpreter included."""
    bits = y.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)


@triton.jit
def _dequant_kernel(
    w, out, n_rows, row_bytes, out_stride,
    TYPE: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, BF16: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    chunk = tl.program_id(1)
    mask = rows < n_rows
    y = _tile(w, row_bytes.to(tl.int64), rows.to(tl.int64), mask, chunk, TYPE, BN)
    at = out + rows.to(tl.int64) * out_stride + chunk * CH + tl.arange(0, CH)[None, :]
    if BF16:
        tl.store(at, _bf16_bits(y), mask=mask)  # out: the bf16 tensor viewed as int16
    else:
        tl.store(at, y, mask=mask)


@triton.jit
def _gather_kernel(
    w, ids, out, n_ids, n_rows, row_bytes, out_stride,
    TYPE: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    at = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    chunk = tl.program_id(1)
    row = tl.load(ids + at, mask=at < n_ids, other=-1).to(tl.int64)
    valid = (row >= 0) & (row < n_rows)  # else zeros, and nothing read
    y = _tile(w, row_bytes.to(tl.int64), tl.where(valid, row, 0), valid, chunk, TYPE, BN)
    dest = out + at.to(tl.int64) * out_stride + chunk * CH + tl.arange(0, CH)[None, :]
    tl.store(dest, tl.where(valid, y, 0.0), mask=at < n_ids)


@triton.jit
def _row_dots(
    w, row_bytes, rows, mask, n_chunks, xrow, TYPE: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr
):
    """Rows `rows` ([BN, 1]) of the matrix at w against the vector at xrow: float32 [BN]."""
    acc = tl.zeros((BN,), dtype=tl.float32)
    for chunk in range(0, n_chunks):
        y = _tile(w, row_bytes.to(tl.int64), rows.to(tl.int64), mask, chunk, TYPE, BN)
        xv = tl.load(xrow + chunk * CH + tl.arange(0, CH)[None, :]).to(tl.float32)
        acc += tl.sum(y * xv, axis=1)
    return acc


@triton.jit
def _matvec_kernel(
    w, x, out, n_rows, row_bytes, n_chunks, x_stride, out_stride,
    TYPE: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    token = tl.program_id(1).to(tl.int64)
    acc = _row_dots(w, row_bytes, rows, rows < n_rows, n_chunks, x + token * x_stride, TYPE, BN, CH)
    r = tl.program_id(0) * BN + tl.arange(0, BN)
    tl.store(out + token * out_stride + r, acc, mask=r < n_rows)


@triton.jit
def _routed_matvec_kernel(
    w, ids, x, out, n_experts, n_rows, row_bytes, expert_bytes, n_chunks, x_stride, x_div, out_stride,
    TYPE: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr,
):  # fmt: skip
    slot = tl.program_id(1).to(tl.int64)
    expert = tl.load(ids + slot).to(tl.int64)
    valid = (expert >= 0) & (expert < n_experts)  # else a dropped slot: zeros
    base = w + tl.where(valid, expert, 0) * expert_bytes
    rows = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    mask = rows < tl.where(valid, n_rows, 0)  # a dropped slot reads nothing
    acc = _row_dots(base, row_bytes, rows, mask, n_chunks, x + (slot // x_div) * x_stride, TYPE, BN, CH)
    r = tl.program_id(0) * BN + tl.arange(0, BN)
    tl.store(out + slot * out_stride + r, tl.where(valid, acc, 0.0), mask=r < n_rows)


def supports(ggml_type: GGMLQuantizationType, cols: int) -> bool:
    """Whether these kernels take a matrix of this type with rows of `cols` values."""
    ggml_type = GGMLQuantizationType(ggml_type)
    return ggml_type in _CODE and cols % _CHUNK[ggml_type] == 0


def _check(blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, cols: int) -> int:
    """The row's bytes, after checking that `blocks` holds rows × cols values of the type."""
    ggml_type = GGMLQuantizationType(ggml_type)
    if ggml_type not in _CODE:
        names = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
        raise UnsupportedError(f"no GPU kernel for {ggml_type.name} (supported: {names})")
    block, type_size = block_layout(ggml_type)
    if cols % _CHUNK[ggml_type]:
        raise UnsupportedError(
            f"{cols} columns is not a multiple of {_CHUNK[ggml_type]} for {ggml_type.name}"
        )
    row_bytes = cols // block * type_size
    if blocks.dtype != torch.uint8 or not blocks.is_contiguous() or blocks.numel() != rows * row_bytes:
        raise ValueError(f"expected {rows} rows of {cols} {ggml_type.name} values as contiguous uint8")
    return row_bytes


def dequantize(
    blocks: torch.Tensor,
    ggml_type: GGMLQuantizationType,
    rows: int,
    cols: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """uint8 blocks of a rows × cols matrix -> a dense [rows, cols] tensor of `dtype` on their device."""
    row_bytes = _check(blocks, ggml_type, rows, cols)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize writes float32 or bfloat16, not {dtype}")
    out = torch.empty(rows, cols, dtype=dtype, device=blocks.device)
    chunk = _CHUNK[GGMLQuantizationType(ggml_type)]
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), cols // chunk)
    bf16 = dtype == torch.bfloat16
    _dequant_kernel[grid](
        blocks, out.view(torch.int16) if bf16 else out, rows, row_bytes, cols,
        TYPE=_CODE[GGMLQuantizationType(ggml_type)], BN=ROWS_PER_PROGRAM, CH=chunk, BF16=bf16, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def gather_rows(
    blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, cols: int, ids: torch.Tensor
) -> torch.Tensor:
    """Rows `ids` (int64 [n], on the blocks' device) of a rows × cols matrix, as float32 [n, cols]:
    a token table's lookup. An id outside [0, rows) gives a row of zeros. Nothing is read on the
    host, so a CUDA graph can hold the call."""
    row_bytes = _check(blocks, ggml_type, rows, cols)
    if ids.dim() != 1 or ids.device != blocks.device:
        raise ValueError(f"ids must be one-dimensional and on the blocks' device, {blocks.device}")
    ids = ids.to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), cols, dtype=torch.float32, device=blocks.device)
    if ids.numel() == 0:
        return out
    chunk = _CHUNK[GGMLQuantizationType(ggml_type)]
    grid = (triton.cdiv(ids.numel(), ROWS_PER_PROGRAM), cols // chunk)
    _gather_kernel[grid](
        blocks, ids, out, ids.numel(), rows, row_bytes, cols,
        TYPE=_CODE[GGMLQuantizationType(ggml_type)], BN=ROWS_PER_PROGRAM, CH=chunk, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def matvec(blocks: torch.Tensor, ggml_type: GGMLQuantizationType, rows: int, x: torch.Tensor) -> torch.Tensor:
    """W · x_t for each of a few tokens: x [n, cols] -> float32 [n, rows], W read as blocks."""
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, columns], got shape {list(x.shape)}")
    n, cols = x.shape
    row_bytes = _check(blocks, ggml_type, rows, cols)
    if x.device != blocks.device:
        raise ValueError(f"x is on {x.device}, the weights on {blocks.device}")
    x = x.contiguous()
    out = torch.empty(n, rows, dtype=torch.float32, device=blocks.device)
    chunk = _CHUNK[GGMLQuantizationType(ggml_type)]
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), n)
    _matvec_kernel[grid](
        blocks, x, out, rows, row_bytes, cols // chunk, cols, rows,
        TYPE=_CODE[GGMLQuantizationType(ggml_type)], BN=ROWS_PER_PROGRAM, CH=chunk,
    )  # fmt: skip
    return out


def routed_matvec(
    blocks: torch.Tensor,
    ggml_type: GGMLQuantizationType,
    n_experts: int,
    rows: int,
    ids: torch.Tensor,
    x: torch.Tensor,
    x_per_slot: int,
) -> torch.Tensor:
    """W_e · x for each routed slot: the experts' matrices [n_experts, rows, cols] as blocks,
    ids [S] (int64, on the device) the expert of each slot, x [n, cols] with slot s reading
    row s // x_per_slot. -> float32 [S, rows]; a slot whose id is outside [0, n_experts)
    (transformers' dropped slot) gives zeros. Nothing is read on the host, so a CUDA graph
    can hold the call."""
    if x.dim() != 2 or ids.dim() != 1 or x_per_slot < 1:
        raise ValueError("routed_matvec takes x [n, cols], ids [slots] and x_per_slot >= 1")
    n, cols = x.shape
    if ids.numel() > n * x_per_slot:
        raise ValueError(f"{ids.numel()} slots read past the {n} rows of x")
    row_bytes = _check(blocks, ggml_type, n_experts * rows, cols)
    if x.device != blocks.device or ids.device != blocks.device:
        raise ValueError(f"x and ids must be on the weights' device, {blocks.device}")
    x, ids = x.contiguous(), ids.to(torch.int64).contiguous()
    out = torch.empty(ids.numel(), rows, dtype=torch.float32, device=blocks.device)
    if ids.numel() == 0:
        return out
    chunk = _CHUNK[GGMLQuantizationType(ggml_type)]
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM), ids.numel())
    _routed_matvec_kernel[grid](
        blocks, ids, x, out, n_experts, rows, row_bytes, rows * row_bytes, cols // chunk, cols, x_per_slot, rows,
        TYPE=_CODE[GGMLQuantizationType(ggml_type)], BN=ROWS_PER_PROGRAM, CH=chunk,
    )  # fmt: skip
    return out
