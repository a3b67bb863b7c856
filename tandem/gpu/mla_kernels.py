"""DeepSeek MLA's decode step on the GPU in two fused pieces, each beside its torch reference.

The absorbed form at one token (tandem.ops.mla) is about thirty small torch kernels a
layer: the latent's norm, the rotary embedding of the query's and the key's rope parts
(complex products for DeepSeek-V2), two index copies into the cache, the mask, the two
score products, the softmax and the value product. Here:

- `mla_rope_append`: rotates every head's rope part of the query, and normalises the
  step's latent, rotates its rope key and writes both into the cache at a position read
  from the GPU (a captured graph replays at every position). One launch.
- `mla_decode_attention`: scores = scale · (q_lat · c_j + q_rope · k_j) over the cached
  latents c_j and rope keys k_j up to that position, softmax, Σ p_j c_j: split over the
  keys as tandem.gpu.decode_attention does (its merge kernel joins the slices). Two
  launches.

Their torch reference is tandem.ops.mla's own arithmetic (tandem.ops.mla_math), which
tests/gpu/test_mla_kernels.py compares them with. ROPE_* name the three layouts of
tandem.ops.mla_math.apply_rope: rotate-half with (cos,
sin) [R]; DeepSeek-V3's interleaved pairs laid out as (evens, odds) with (cos, sin) [R]
(first halves used); DeepSeek-V2's interleaved pairs in place with complex freqs [R/2],
passed as float pairs (re, im).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.gpu.decode_attention import _ceil_div, _merge_kernel

ROPE_HALF, ROPE_V3_INTERLEAVED, ROPE_V2_COMPLEX = 0, 1, 2
BLOCK_KEYS = 16  # keys per step of a slice: a block of 16 latents of 512 floats in registers
TARGET_PROGRAMS = 264  # programs the key slices aim at (about two per SM of an H200)


@triton.jit
def _rotate(x_ptr, cos_ptr, sin_ptr, R: tl.constexpr, MODE: tl.constexpr):
    """The R rope values at x_ptr rotated, float32 [R]."""
    d = tl.arange(0, R)
    first = d < R // 2
    if MODE == 0:  # rotate_half: (x1, x2) -> x·cos + (-x2, x1)·sin
        a = d
        b = tl.where(first, d + R // 2, d - R // 2)
        c = tl.load(cos_ptr + d)
        s = tl.load(sin_ptr + d)
        sign = tl.where(first, -1.0, 1.0)
    elif MODE == 1:  # pairs (x[2p], x[2p+1]) rotated, out = (evens, odds)
        p = tl.where(first, d, d - R // 2)
        a = 2 * p + tl.where(first, 0, 1)
        b = 2 * p + tl.where(first, 1, 0)
        c = tl.load(cos_ptr + p)
        s = tl.load(sin_ptr + p)
        sign = tl.where(first, -1.0, 1.0)
    else:  # pairs rotated in place by the complex freqs (re, im) of pair d // 2
        even = d % 2 == 0
        a = d
        b = tl.where(even, d + 1, d - 1)
        c = tl.load(cos_ptr + 2 * (d // 2))
        s = tl.load(cos_ptr + 2 * (d // 2) + 1)
        sign = tl.where(even, -1.0, 1.0)
    xa = tl.load(x_ptr + a).to(tl.float32)
    xb = tl.load(x_ptr + b).to(tl.float32)
    return xa * c + sign * xb * s


@triton.jit
def _rope_append_kernel(
    q_ptr, kv_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, q_rope_ptr, lat_ptr, kr_ptr,
    q_head, nope, lat_row, kr_row, eps,
    H: tl.constexpr, LAT: tl.constexpr, R: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    d = tl.arange(0, R)
    if head < H:  # a query head's rope part
        y = _rotate(q_ptr + head * q_head + nope, cos_ptr, sin_ptr, R, MODE)
        tl.store(q_rope_ptr + head * R + d, y)
    else:  # the step's latent (normalised) and rope key, into the cache
        pos = tl.load(pos_ptr)
        i = tl.arange(0, LAT)
        c = tl.load(kv_ptr + i).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(c * c, 0) / LAT + eps)
        tl.store(lat_ptr + pos * lat_row + i, (c * r * tl.load(norm_ptr + i)).to(lat_ptr.dtype.element_ty))
        y = _rotate(kv_ptr + LAT, cos_ptr, sin_ptr, R, MODE)
        tl.store(kr_ptr + pos * kr_row + d, y.to(kr_ptr.dtype.element_ty))


def rope_tables(position_embeddings, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's rotation as two contiguous float32 vectors the kernels read."""
    if mode == ROPE_V2_COMPLEX:
        pairs = torch.view_as_real(position_embeddings.reshape(-1)).reshape(-1).float()  # (re, im) per pair
        return pairs, pairs
    cos, sin = position_embeddings
    return cos.reshape(-1).float().contiguous(), sin.reshape(-1).float().contiguous()


def mla_rope_append(
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_norm: torch.Tensor,
    eps: float,
    position_embeddings,
    mode: int,
    position: torch.Tensor,
    latents: torch.Tensor,
    rope_keys: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """q [H · (nope + R)] (one token's queries, heads in turn), kv [LAT + R] (kv_a's output),
    kv_norm [LAT], the step's position_embeddings in `mode`'s layout, position int64 [1] on the
    GPU, latents [1, 1, capacity, LAT] and rope_keys [1, 1, capacity, R] (the cache's) ->
    the rotated query rope parts [H, R] float32; the cache rows at `position` are written."""
    lat, r = latents.shape[-1], rope_keys.shape[-1]
    nope = q.numel() // heads - r
    q, kv = q.contiguous(), kv.contiguous()
    cos, sin = rope_tables(position_embeddings, mode)
    q_rope = torch.empty(heads, r, dtype=torch.float32, device=q.device)
    _rope_append_kernel[(heads + 1,)](
        q, kv, kv_norm, cos, sin, position, q_rope, latents, rope_keys,
        nope + r, nope, latents.stride(2), rope_keys.stride(2), float(eps),
        H=heads, LAT=lat, R=r, MODE=mode, num_warps=4,
    )  # fmt: skip
    return q_rope


@triton.jit
def _attention_slice_kernel(
    ql_ptr, qr_ptr, lat_ptr, kr_ptr, pos_ptr, part_ptr,
    lat_row, kr_row, n_keys, keys_per_slice, n_slices, scale,
    LAT: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    piece = tl.program_id(1)
    i = tl.arange(0, LAT)
    d = tl.arange(0, R)
    ql = tl.load(ql_ptr + head * LAT + i).to(tl.float32) * scale
    qr = tl.load(qr_ptr + head * R + d).to(tl.float32) * scale
    start = piece * keys_per_slice
    end = tl.minimum(tl.minimum(start + keys_per_slice, n_keys), tl.load(pos_ptr).to(tl.int32) + 1)
    top = tl.full((), -1.0e30, tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((LAT,), tl.float32)
    for first in range(start, end, BLOCK):
        n = first + tl.arange(0, BLOCK)
        seen = n < end
        c = tl.load(lat_ptr + n[:, None] * lat_row + i[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
        k = tl.load(kr_ptr + n[:, None] * kr_row + d[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
        s = tl.sum(c * ql[None, :], 1) + tl.sum(k * qr[None, :], 1)
        s = tl.where(seen, s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, 0))
        rescale = tl.exp(top - new_top)
        p = tl.exp(s - new_top)
        total = total * rescale + tl.sum(p, 0)
        acc = acc * rescale + tl.sum(p[:, None] * c, 0)
        top = new_top
    out = part_ptr + (head * n_slices + piece) * (LAT + 2)
    tl.store(out, top)
    tl.store(out + 1, total)
    tl.store(out + 2 + i, acc)


def mla_decode_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latents: torch.Tensor,
    rope_keys: torch.Tensor,
    position: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_lat [H, LAT], q_rope [H, R] float32; latents [1, 1, S, LAT] and rope_keys [1, 1, S, R]
    (the cache, keys 0..position attended) -> Σ_j softmax_j · c_j, [H, LAT] float32."""
    heads, lat = q_lat.shape
    r, n_keys = rope_keys.shape[-1], latents.shape[2]
    q_lat, q_rope = q_lat.contiguous(), q_rope.contiguous()  # rows read at head · width
    slices = max(1, min(_ceil_div(n_keys, BLOCK_KEYS), TARGET_PROGRAMS // heads))
    per_slice = _ceil_div(_ceil_div(n_keys, slices), BLOCK_KEYS) * BLOCK_KEYS
    slices = _ceil_div(n_keys, per_slice)
    parts = torch.empty(heads, slices, lat + 2, dtype=torch.float32, device=q_lat.device)
    _attention_slice_kernel[(heads, slices)](
        q_lat, q_rope, latents, rope_keys, position, parts,
        latents.stride(2), rope_keys.stride(2), n_keys, per_slice, slices, float(scale),
        LAT=lat, R=r, BLOCK=BLOCK_KEYS, num_warps=4,
    )  # fmt: skip
    out = torch.empty(heads, lat, dtype=torch.float32, device=q_lat.device)
    _merge_kernel[(heads,)](parts, out, slices, DV=lat, SLICES=triton.next_power_of_2(slices))
    return out
