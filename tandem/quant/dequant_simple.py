"""Dequantization of the float types and the 32-value block types.

Each kernel takes one chunk of blocks, uint8 [n, type_size], and writes
float32 [n, block_size] into `out`. Arithmetic follows the order of
gguf.quants (the numpy reference) step by step, because float32 results are
compared bit for bit: d * q, then + m for the types with a minimum.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from tandem.quant.dequant_bits import SHIFTS_1BIT, bit_planes, fp16_field, signed, split_nibbles


def _as(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret contiguous [n, itemsize] bytes as [n, 1] of `dtype`, copying if misaligned."""
    if blocks.storage_offset() % blocks.shape[1] != 0:
        blocks = blocks.clone()
    return blocks.view(dtype)


def f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_as(blocks, torch.float32))


def f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_as(blocks, torch.float16))


def bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # bfloat16 -> float32 only appends 16 zero bits, as gguf's `<< 16` does.
    out.copy_(_as(blocks, torch.bfloat16))


def _low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes per block -> uint8 [n, 32] codes in value order."""
    return split_nibbles(qs).view(qs.shape[0], 32)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes per block (a little-endian uint32) -> uint8 [n, 32] of bit i << 4."""
    # [n, 4, 8, 1]: byte b, bit i is value 8 * b + i, as in the uint32's bit order.
    bits = bit_planes(qh.unsqueeze(-1), SHIFTS_1BIT, 1).view(qh.shape[0], 32)
    return bits.bitwise_left_shift_(4)


def q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | qs: 16 bytes
    d = fp16_field(blocks, 0)  # [n, 1]
    q = signed(_low_high_nibbles(blocks[:, 2:18]), 8)  # [n, 32] int8
    out.copy_(q).mul_(d)


def q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | m: f16 | qs: 16 bytes
    d = fp16_field(blocks, 0)  # [n, 1]
    m = fp16_field(blocks, 2)  # [n, 1]
    q = _low_high_nibbles(blocks[:, 4:20])  # [n, 32]
    out.copy_(q).mul_(d).add_(m)


def q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | qh: 4 bytes, the fifth bit of each value | qs: 16 bytes
    d = fp16_field(blocks, 0)  # [n, 1]
    q = _low_high_nibbles(blocks[:, 6:22]).bitwise_or_(_fifth_bits(blocks[:, 2:6]))  # [n, 32]
    out.copy_(signed(q, 16)).mul_(d)


def q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | m: f16 | qh: 4 bytes | qs: 16 bytes
    d = fp16_field(blocks, 0)  # [n, 1]
    m = fp16_field(blocks, 2)  # [n, 1]
    q = _low_high_nibbles(blocks[:, 8:24]).bitwise_or_(_fifth_bits(blocks[:, 4:8]))  # [n, 32]
    out.copy_(q).mul_(d).add_(m)


def q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | qs: 32 int8
    d = fp16_field(blocks, 0)  # [n, 1]
    out.copy_(blocks[:, 2:34].view(torch.int8)).mul_(d)


KERNELS = {
    T.F32: f32,
    T.F16: f16,
    T.BF16: bf16,
    T.Q4_0: q4_0,
    T.Q4_1: q4_1,
    T.Q5_0: q5_0,
    T.Q5_1: q5_1,
    T.Q8_0: q8_0,
}
