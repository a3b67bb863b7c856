"""Bit-unpacking helpers shared by the per-type dequantization kernels.

Every helper works on uint8 tensors whose last dimension is contiguous: a
chunk of blocks is a [n_blocks, type_size] uint8 tensor, and a field of it is a
column slice such as blocks[:, 4:16] (strided rows, contiguous bytes).
"""

from __future__ import annotations

import torch

# Shift amounts that pull every 1-, 2- or 4-bit field out of a byte, lowest bits first.
SHIFTS_1BIT = torch.arange(0, 8, 1, dtype=torch.uint8).view(8, 1)  # [8, 1]
SHIFTS_2BIT = torch.arange(0, 8, 2, dtype=torch.uint8).view(4, 1)  # [4, 1]


def fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 stored at byte `offset` of every block, as float32 [n_blocks, 1].

    The column is copied first because block sizes such as 18 or 210 leave it
    at odd addresses, and torch only reinterprets bytes at aligned offsets.
    """
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] -> uint8 [..., 2, k]: low nibbles, then high nibbles.

    ggml packs value i of a group into the low nibble of byte i and value
    k + i into its high nibble, so this order is the value order.
    """
    out = torch.empty(*packed.shape[:-1], 2, packed.shape[-1], dtype=torch.uint8)
    torch.bitwise_and(packed, 0x0F, out=out.select(-2, 0))
    torch.bitwise_right_shift(packed, 4, out=out.select(-2, 1))
    return out


def bit_planes(packed: torch.Tensor, shifts: torch.Tensor, mask: int) -> torch.Tensor:
    """uint8 [..., k] -> uint8 [..., len(shifts), k]: (packed >> shift) & mask per shift.

    Plane p holds bits shifts[p].. of every byte, the order in which ggml
    stores consecutive groups of k values in the same bytes.
    """
    planes = torch.bitwise_right_shift(packed.unsqueeze(-2), shifts)
    return planes.bitwise_and_(mask)


def signed(q: torch.Tensor, offset: int) -> torch.Tensor:
    """uint8 codes minus `offset`, reinterpreted as int8 (in place).

    uint8 subtraction wraps modulo 256, so viewing the result as int8 gives
    exactly ggml's `(int8)q - offset` for codes in [0, offset + 127].
    """
    return q.sub_(offset).view(torch.int8)
