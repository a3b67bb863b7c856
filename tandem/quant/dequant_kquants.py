"""Dequantization of the 256-value super-block types: Q2_K..Q6_K and IQ4_XS.

Each kernel takes one chunk of blocks, uint8 [n, type_size], and writes
float32 [n, 256] into `out`. A super-block is split into sub-blocks of 16 or
32 values with their own integer scale (and minimum); the float32 steps follow
gguf.quants exactly so results match bit for bit: sub-block scale = d * sc,
value = scale * q, then - dmin * m where there is a minimum.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from tandem.quant.dequant_bits import SHIFTS_1BIT, SHIFTS_2BIT, bit_planes, fp16_field, signed, split_nibbles

# The non-linear code book of IQ4_NL / IQ4_XS (kvalues_iq4nl in ggml).
IQ4_VALUES = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32
)


def _scale_min_6bit(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes per block -> 8 six-bit scales and 8 six-bit minimums, uint8 [n, 8] each.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 minimums 0-3 in their low six
    bits; the high two bits of those bytes are the top bits of scales and
    minimums 4-7, whose low four bits sit in the nibbles of bytes 8-11.
    """
    n = packed.shape[0]
    rows = packed.view(n, 3, 4)
    sc_lo, m_lo, mixed = rows[:, 0], rows[:, 1], rows[:, 2]  # [n, 4] each
    sc = torch.empty(n, 2, 4, dtype=torch.uint8)
    m = torch.empty(n, 2, 4, dtype=torch.uint8)
    torch.bitwise_and(sc_lo, 0x3F, out=sc[:, 0])
    torch.bitwise_and(m_lo, 0x3F, out=m[:, 0])
    torch.bitwise_or(mixed & 0x0F, (sc_lo >> 2) & 0x30, out=sc[:, 1])
    torch.bitwise_or(mixed >> 4, (m_lo >> 2) & 0x30, out=m[:, 1])
    return sc.view(n, 8), m.view(n, 8)


def _scale_times_q_minus(
    out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
) -> None:
    """out = scale * q (- minimum), per sub-block, in gguf's order.

    out: float32 [n, 256]; q: codes [n, S, 256 // S]; scale, minimum: float32 [n, S].
    Separate in-place ops, never a fused multiply-add, which would round differently.
    """
    vals = out.view(q.shape)
    vals.copy_(q).mul_(scale.unsqueeze(-1))
    if minimum is not None:
        vals.sub_(minimum.unsqueeze(-1))


def q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # scales: 16 bytes (low nibble scale, high nibble min) | qs: 64 bytes | d: f16 | dmin: f16
    n = blocks.shape[0]
    d = fp16_field(blocks, 80)  # [n, 1]
    dmin = fp16_field(blocks, 82)  # [n, 1]
    scales = blocks[:, 0:16]  # [n, 16]
    dl = d * (scales & 0x0F)  # [n, 16]
    ml = dmin * (scales >> 4)  # [n, 16]
    # Each 32-byte half holds 128 values as four 2-bit planes of 32.
    q = bit_planes(blocks[:, 16:80].view(n, 2, 32), SHIFTS_2BIT, 3)  # [n, 2, 4, 32]
    _scale_times_q_minus(out, q.view(n, 16, 16), dl, ml)


def q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # hmask: 32 bytes | qs: 64 bytes | scales: 12 bytes (16 six-bit) | d: f16
    n = blocks.shape[0]
    d = fp16_field(blocks, 108)  # [n, 1]
    scales = blocks[:, 96:108]
    # Low four bits of the 16 scales are the nibbles of bytes 0-7 (all low
    # nibbles first), the high two bits are the 2-bit planes of bytes 8-11.
    sc_lo = split_nibbles(scales[:, 0:8]).view(n, 16)
    sc_hi = bit_planes(scales[:, 8:12], SHIFTS_2BIT, 3).view(n, 16)
    sc = signed(sc_lo.bitwise_or_(sc_hi.bitwise_left_shift_(4)), 32)  # [n, 16] int8
    dl = d * sc  # [n, 16]
    q_lo = bit_planes(blocks[:, 32:96].view(n, 2, 32), SHIFTS_2BIT, 3).view(n, 8, 32)
    q_hi = bit_planes(blocks[:, 0:32], SHIFTS_1BIT, 1)  # [n, 8, 32]
    # A clear hmask bit subtracts 4: q = q_lo - 4 * (1 - h) = (q_lo | h << 2) - 4.
    q = signed(q_lo.bitwise_or_(q_hi.bitwise_left_shift_(2)), 4)  # [n, 8, 32] int8
    _scale_times_q_minus(out, q.view(n, 16, 16), dl, None)


def q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | dmin: f16 | scales: 12 bytes (8 six-bit scales and mins) | qs: 128 bytes
    n = blocks.shape[0]
    d = fp16_field(blocks, 0)  # [n, 1]
    dmin = fp16_field(blocks, 2)  # [n, 1]
    sc, m = _scale_min_6bit(blocks[:, 4:16])  # [n, 8] each
    # Each 32-byte group holds 64 values: low nibbles, then high nibbles.
    q = split_nibbles(blocks[:, 16:144].view(n, 4, 32))  # [n, 4, 2, 32]
    _scale_times_q_minus(out, q.view(n, 8, 32), d * sc, dmin * m)


def q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes (fifth bits) | qs: 128 bytes
    n = blocks.shape[0]
    d = fp16_field(blocks, 0)  # [n, 1]
    dmin = fp16_field(blocks, 2)  # [n, 1]
    sc, m = _scale_min_6bit(blocks[:, 4:16])  # [n, 8] each
    q = split_nibbles(blocks[:, 48:176].view(n, 4, 32)).view(n, 8, 32)
    # Bit j of qh byte i is the fifth bit of value 32 * j + i.
    q_hi = bit_planes(blocks[:, 16:48], SHIFTS_1BIT, 1)  # [n, 8, 32]
    q.bitwise_or_(q_hi.bitwise_left_shift_(4))
    _scale_times_q_minus(out, q, d * sc, dmin * m)


def q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # ql: 128 bytes (low 4 bits) | qh: 64 bytes (high 2 bits) | scales: 16 int8 | d: f16
    n = blocks.shape[0]
    d = fp16_field(blocks, 208)  # [n, 1]
    dl = d * blocks[:, 192:208].view(torch.int8)  # [n, 16]
    # Per 128-value half: 64 ql bytes give values 0-63 (low) and 64-127
    # (high nibbles); 32 qh bytes give the top two bits as four planes.
    q = split_nibbles(blocks[:, 0:128].view(n, 2, 64)).view(n, 8, 32)
    q_hi = bit_planes(blocks[:, 128:192].view(n, 2, 32), SHIFTS_2BIT, 3).view(n, 8, 32)
    q = signed(q.bitwise_or_(q_hi.bitwise_left_shift_(4)), 32)  # [n, 8, 32] int8
    _scale_times_q_minus(out, q.view(n, 16, 16), dl, None)


def iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d: f16 | scales_h: 2 bytes (2 bits each) | scales_l: 4 bytes (nibbles) | qs: 128 bytes
    n = blocks.shape[0]
    d = fp16_field(blocks, 0)  # [n, 1]
    # Scale j: low four bits in nibble j of bytes 2..5 (byte j // 2, low nibble
    # first), high two bits at bit 2 * j of the little-endian uint16 in bytes 0..1.
    sc_lo = split_nibbles(blocks[:, 4:8].unsqueeze(-1)).view(n, 8)
    sc_hi = bit_planes(blocks[:, 2:4].unsqueeze(-1), SHIFTS_2BIT, 3).view(n, 8)
    sc = signed(sc_lo.bitwise_or_(sc_hi.bitwise_left_shift_(4)), 32)  # [n, 8] int8
    dl = d * sc  # [n, 8]
    codes = split_nibbles(blocks[:, 8:136].view(n, 8, 16))  # [n, 8, 2, 16]
    vals = out.view(n, 8, 32)
    torch.index_select(IQ4_VALUES, 0, codes.view(-1).int(), out=out.view(-1))
    vals.mul_(dl.unsqueeze(-1))


KERNELS = {
    T.Q2_K: q2_k,
    T.Q3_K: q3_k,
    T.Q4_K: q4_k,
    T.Q5_K: q5_k,
    T.Q6_K: q6_k,
    T.IQ4_XS: iq4_xs,
}
