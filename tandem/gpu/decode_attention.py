"""One query position's attention over a KV cache, split over the keys (flash-decoding).

A decode step asks each layer for one query per head against every cached key. torch's
kernels for that either copy each key/value head once per query head of its group
(Hugging Face's GQA path) or give a whole head to one thread block, which then walks
every key alone while most of the GPU idles. Here each program takes one query head and
one slice of the keys, keeps a running softmax over them (maximum, sum and the weighted
values, in float32), and a second kernel merges the slices of each head. Key and value
heads are read where they are: query head h uses key head h // (Hq / Hkv).

A boolean mask over the keys (a captured decode step hides its buffers' unwritten rows
that way) is read per key; without one every key counts. A position read from the GPU
(the step's) ends the keys instead: slices past it do nothing. The torch reference
`decode_attention_reference` is what the tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_KEYS = 32
# About eight programs per SM of an H100/H200, so that each slice is a few blocks of keys: a
# slice's loop is latency-bound. On the H200 (benchmarks/decode_attention_bench.py, Qwen3's
# heads) 1056 took a call from 8.86 to 6.60 µs at 544 keys and from 34.4 to 24.0 at 4096
# against 264; 2112 was no faster.
TARGET_PROGRAMS = 1056


@triton.jit
def _slice_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, part_ptr,
    stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
    n_keys, keys_per_slice, n_slices, scale,
    GROUP: tl.constexpr, HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    piece = tl.program_id(1)
    kv_head = head // GROUP
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q = tl.load(q_ptr + head * stride_qh + d).to(tl.float32) * scale
    start = piece * keys_per_slice
    end = tl.minimum(start + keys_per_slice, n_keys)
    if HAS_POS:  # keys up to the step's position, read on the GPU (a graph replays at any position)
        end = tl.minimum(end, tl.load(pos_ptr).to(tl.int32) + 1)
    top = tl.full((), -1.0e30, tl.float32)  # finite: a slice of hidden keys keeps exp() defined
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((DV,), tl.float32)
    for first in range(start, end, BLOCK):
        n = first + tl.arange(0, BLOCK)
        seen = n < end
        if HAS_MASK:
            seen = seen & (tl.load(mask_ptr + n, mask=seen, other=0) != 0)
        k = tl.load(
            k_ptr + kv_head * stride_kh + n[:, None] * stride_ks + d[None, :], mask=seen[:, None], other=0.0
        )
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(seen, s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, 0))
        rescale = tl.exp(top - new_top)
        p = tl.exp(s - new_top)
        v = tl.load(
            v_ptr + kv_head * stride_vh + n[:, None] * stride_vs + dv[None, :], mask=seen[:, None], other=0.0
        )
        total = total * rescale + tl.sum(p, 0)
        acc = acc * rescale + tl.sum(p[:, None] * v.to(tl.float32), 0)
        top = new_top
    out = part_ptr + (head * n_slices + piece) * (DV + 2)
    tl.store(out, top)
    tl.store(out + 1, total)
    tl.store(out + 2 + dv, acc)


@triton.jit
def _merge_kernel(part_ptr, out_ptr, n_slices, DV: tl.constexpr, SLICES: tl.constexpr):
    head = tl.program_id(0)
    i = tl.arange(0, SLICES)
    dv = tl.arange(0, DV)
    used = i < n_slices
    base = part_ptr + (head * n_slices + i) * (DV + 2)
    top = tl.load(base, mask=used, other=-1.0e30)
    total = tl.load(base + 1, mask=used, other=0.0)
    acc = tl.load(base[:, None] + 2 + dv[None, :], mask=used[:, None], other=0.0)
    weight = tl.exp(top - tl.max(top, 0))
    value = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(out_ptr + head * DV + dv, value.to(out_ptr.dtype.element_ty))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Shapes this kernel takes: batch 1, one query, power-of-two head sizes, whole groups,
    and no mask or a boolean one over the keys."""
    b, hq, t, d = query.shape
    dv = value.shape[-1]
    if b != 1 or t != 1 or key.shape[0] != 1 or hq % key.shape[1] or key.shape[2] == 0:
        return False
    if d & (d - 1) or dv & (dv - 1) or d > 512 or dv > 512:
        return False
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        return False
    # A mask: one boolean row for every head and the query, at least as long as the keys.
    return mask is None or (mask.dtype == torch.bool and mask.numel() == mask.shape[-1] >= key.shape[2])


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    position: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """query [1, Hq, 1, D], key [1, Hkv, S, D], value [1, Hkv, S, Dv], mask [.., S'] bool
    (True: attend; S' >= S, its first S used) or None; position: int64 [1] on the GPU, keys
    past it unseen, or None -> [1, 1, Hq, Dv] in out_dtype (default the query's)."""
    _, hq, _, d = query.shape
    hkv, n_keys, dv = key.shape[1], key.shape[2], value.shape[-1]
    slices = max(1, min(_ceil_div(n_keys, BLOCK_KEYS), TARGET_PROGRAMS // hq))
    per_slice = _ceil_div(_ceil_div(n_keys, slices), BLOCK_KEYS) * BLOCK_KEYS
    slices = _ceil_div(n_keys, per_slice)
    parts = torch.empty(hq, slices, dv + 2, dtype=torch.float32, device=query.device)
    flat_mask = mask.reshape(-1).contiguous() if mask is not None else parts  # (unused without a mask)
    _slice_kernel[(hq, slices)](
        query, key, value, flat_mask, position if position is not None else parts, parts,
        query.stride(1), key.stride(1), key.stride(2), value.stride(1), value.stride(2),
        n_keys, per_slice, slices, float(scale),
        GROUP=hq // hkv, HAS_MASK=mask is not None, HAS_POS=position is not None, D=d, DV=dv,
        BLOCK=BLOCK_KEYS,
    )  # fmt: skip
    out = torch.empty(1, 1, hq, dv, dtype=out_dtype or query.dtype, device=query.device)
    _merge_kernel[(hq,)](parts, out, slices, DV=dv, SLICES=triton.next_power_of_2(slices))
    return out


def decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    position: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The same in float64 torch: softmax(q·k·scale, hidden keys out) · v."""
    if position is not None:
        last = int(position.item()) + 1
        key, value = key[:, :, :last], value[:, :, :last]
    group = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = (query.double() @ k.transpose(2, 3)) * scale  # [1, Hq, 1, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(-1)[: key.shape[2]].view(1, 1, 1, -1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [1, Hq, 1, Dv]
    return out.transpose(1, 2).to(out_dtype or query.dtype)
