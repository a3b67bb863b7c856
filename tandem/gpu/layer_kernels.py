"""A decode step's small per-layer operations on the GPU, each fused into one kernel.

At one token a decoder layer's norms, rotary embedding, cache writes and residual adds
move a few kilobytes each, but in torch they are dozens of kernels a layer (a Qwen3-MoE
step launched about 37 a layer, 1,790 in all, each a couple of microseconds whatever
its size). These kernels do the same arithmetic in one launch each:

- `rms_norm`: y = x · rsqrt(mean(x²) + eps) · scale, optionally after h = x + d (+ bias)
  (the residual add before a norm, h written too). Float32 math; y in any dtype.
- `qkv_rope_append`: from one token's fused q|k|v projection: bias, the per-head q/k
  norms (Qwen3), the rotary embedding in Hugging Face's rotate-half form with the
  step's cos/sin, and the key and value written into the cache at a position read from
  the GPU (so that a captured graph replays at every position).
- `route_pack`: the router's choice of k experts from its logits (softmax or sigmoid
  scores, DeepSeek's bias and expert groups, ties to the lower index, renormalisation,
  scaling; `Routing`), and the ids, weights and hidden state written where the CPU
  engine reads them (page-locked memory, written by the GPU directly), and then, if
  asked, the engine's request word.
- `expert_sum`: the layer's residual plus the engine's output, read from page-locked
  memory where the engine wrote it, plus the shared experts'; clears the engine's answer.

Each has its torch reference (`*_reference`), which the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, d_ptr, bias_ptr, h_ptr, scale_ptr, y_ptr, n, eps,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    used = i < n
    x = tl.load(x_ptr + row * n + i, mask=used, other=0.0).to(tl.float32)
    if HAS_D:
        d = tl.load(d_ptr + row * n + i, mask=used, other=0.0).to(tl.float32)
        if HAS_BIAS:
            d += tl.load(bias_ptr + i, mask=used, other=0.0)
        x += d
        tl.store(h_ptr + row * n + i, x, mask=used)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(scale_ptr + i, mask=used, other=0.0)
    tl.store(y_ptr + row * n + i, (x * r * w).to(y_ptr.dtype.element_ty), mask=used)


def rms_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype = torch.float32,
    d: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """x [T, n] (+ d [T, n] + bias [n]) -> (h = x + d + bias float32, or None without d;
    y = norm(h or x) · scale in out_dtype). Contiguous inputs."""
    t, n = x.shape
    y = torch.empty(t, n, dtype=out_dtype, device=x.device)
    h = torch.empty(t, n, dtype=torch.float32, device=x.device) if d is not None else None
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(t,)](
        x, d if d is not None else x, bias if bias is not None else scale, h if h is not None else y,
        scale, y, n, float(eps),
        HAS_D=d is not None, HAS_BIAS=bias is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return h, y


def rms_norm_reference(x, scale, eps, out_dtype=torch.float32, d=None, bias=None):
    h = None
    if d is not None:
        h = x.float() + (d.float() + bias if bias is not None else d.float())
    src = h if h is not None else x.float()
    y = torch.nn.functional.rms_norm(src, (src.shape[-1],), scale, eps).to(out_dtype)
    return h, y


@triton.jit
def _norm_rope(x, xp, w_ptr, cos_ptr, sin_ptr, d, partner, eps, NORM: tl.constexpr, D: tl.constexpr):
    """One q or k head: the optional head norm (scales w), then rotate-half RoPE."""
    if NORM:
        r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        x = x * r * tl.load(w_ptr + d)
        xp = xp * r * tl.load(w_ptr + partner)
    rotated = tl.where(d < D // 2, -xp, xp)  # (x1, x2) -> (-x2, x1)
    return x * tl.load(cos_ptr + d) + rotated * tl.load(sin_ptr + d)


@triton.jit
def _qkv_rope_append_kernel(
    qkv_ptr, bias_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
    stride_kh, stride_ks, stride_vh, stride_vs, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    HAS_BIAS: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)  # q heads, then k heads, then v heads
    d = tl.arange(0, D)
    partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
    base = head * D
    x = tl.load(qkv_ptr + base + d).to(tl.float32)
    xp = tl.load(qkv_ptr + base + partner).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + base + d)
        xp += tl.load(bias_ptr + base + partner)
    pos = tl.load(pos_ptr)
    if head < HQ:
        y = _norm_rope(x, xp, qn_ptr, cos_ptr, sin_ptr, d, partner, eps, Q_NORM, D)
        tl.store(q_ptr + base + d, y.to(q_ptr.dtype.element_ty))
    elif head < HQ + HKV:
        y = _norm_rope(x, xp, kn_ptr, cos_ptr, sin_ptr, d, partner, eps, K_NORM, D)
        tl.store(k_ptr + (head - HQ) * stride_kh + pos * stride_ks + d, y.to(k_ptr.dtype.element_ty))
    else:  # a value head: into the cache as it is
        vh = head - HQ - HKV
        tl.store(v_ptr + vh * stride_vh + pos * stride_vs + d, x.to(v_ptr.dtype.element_ty))


def qkv_rope_append(
    qkv: torch.Tensor,
    bias: torch.Tensor | None,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """qkv [(Hq + 2 Hkv) · D] (one token's projections, any float dtype), bias likewise or
    None, q_norm/k_norm scales [D] or None, cos/sin [D] float32, position int64 [1] on the
    GPU, keys/values [1, Hkv, capacity, D] -> queries [1, Hq, 1, D] float32; the key and
    value rows at `position` are written."""
    hkv, d = keys.shape[1], keys.shape[3]
    q = torch.empty(1, n_heads, 1, d, dtype=torch.float32, device=qkv.device)
    _qkv_rope_append_kernel[(n_heads + 2 * hkv,)](
        qkv, bias if bias is not None else cos, q_norm if q_norm is not None else cos,
        k_norm if k_norm is not None else cos, cos, sin, position, q, keys, values,
        keys.stride(1), keys.stride(2), values.stride(1), values.stride(2), float(eps),
        HQ=n_heads, HKV=hkv, D=d, HAS_BIAS=bias is not None, Q_NORM=q_norm is not None,
        K_NORM=k_norm is not None, num_warps=1 if d <= 128 else 2,
    )  # fmt: skip
    return q


def qkv_rope_append_reference(qkv, bias, q_norm, k_norm, eps, cos, sin, position, keys, values, n_heads):
    """Hugging Face's order of operations in torch (Qwen3's attention forward)."""
    hkv, d = keys.shape[1], keys.shape[3]
    x = qkv.float() + (bias if bias is not None else 0.0)
    q, k, v = x.split([n_heads * d, hkv * d, hkv * d])
    q, k, v = q.view(1, n_heads, 1, d), k.view(1, hkv, 1, d), v.view(1, hkv, 1, d)
    if q_norm is not None:
        q = torch.nn.functional.rms_norm(q, (d,), q_norm, eps)
    if k_norm is not None:
        k = torch.nn.functional.rms_norm(k, (d,), k_norm, eps)

    def rotate(t):
        return torch.cat((-t[..., d // 2 :], t[..., : d // 2]), dim=-1)

    q = q * cos + rotate(q) * sin
    k = k * cos + rotate(k) * sin
    keys.index_copy_(2, position, k.to(keys.dtype))
    values.index_copy_(2, position, v.to(values.dtype))
    return q


@dataclass(frozen=True)
class Routing:
    """How a router turns its logits into k experts and weights (the families' routers):

    scores = softmax(logits), or sigmoid(logits) with `sigmoid`; the choice is scores +
    `bias` (DeepSeek-V3's correction); with `groups` > 1, only experts of the best
    `topk_group` groups of E / groups experts compete, a group scored by its best choice
    (DeepSeek-V2) or the sum of its best two (`group_top2`, DeepSeek-V3); the k best
    choices win (ties to the lower index); their weights are their scores, divided by
    their sum (+ renorm_eps) with `renormalize`, times `scaling`."""

    top_k: int
    renormalize: bool = False
    sigmoid: bool = False
    groups: int = 1
    topk_group: int = 1
    group_top2: bool = False
    renorm_eps: float = 0.0
    scaling: float = 1.0

    def supported(self, n_experts: int) -> bool:
        """Grouped routing reshapes the experts into [groups, E / groups]: powers of two only."""
        if not 0 < self.top_k <= n_experts:
            return False
        if self.groups == 1:
            return True
        pow2 = n_experts & (n_experts - 1) == 0 and self.groups & (self.groups - 1) == 0
        return pow2 and n_experts % self.groups == 0 and 0 < self.topk_group <= self.groups


@triton.jit
def _route_pack_kernel(
    logits_ptr, bias_ptr, x_ptr, ids_ptr, w_ptr, x_out_ptr, signal_ptr, code, n_experts, hidden,
    scaling, renorm_eps,
    K: tl.constexpr, RENORM: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr, SIGNAL: tl.constexpr,
    E_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, H_BLOCK: tl.constexpr,
):  # fmt: skip
    e = tl.arange(0, E_BLOCK)
    used = e < n_experts
    logits = tl.load(logits_ptr + e, mask=used, other=0.0).to(tl.float32)
    if SIGMOID:
        score = 1.0 / (1.0 + tl.exp(-logits))
    else:
        p = tl.exp(tl.where(used, logits, float("-inf")) - tl.max(tl.where(used, logits, float("-inf")), 0))
        score = p / tl.sum(p, 0)
    choice = score
    if HAS_BIAS:
        choice += tl.load(bias_ptr + e, mask=used, other=0.0)
    choice = tl.where(used, choice, float("-inf"))
    if GROUPS > 1:  # E_BLOCK == E here (powers of two)
        SIZE: tl.constexpr = E_BLOCK // GROUPS
        c2 = tl.reshape(choice, (GROUPS, SIZE))
        j = tl.arange(0, SIZE)[None, :]
        best = tl.max(c2, 1)
        if GROUP_TOP2:
            first = tl.min(tl.where(c2 == best[:, None], j, SIZE), 1)
            best += tl.max(tl.where(j == first[:, None], float("-inf"), c2), 1)
        g = tl.arange(0, GROUPS)
        kept = tl.zeros((GROUPS,), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(best, 0)
            pick = tl.min(tl.where(best == top, g, GROUPS), 0)
            kept = tl.where(g == pick, 1, kept)
            best = tl.where(g == pick, float("-inf"), best)
        keep = tl.reshape(tl.broadcast_to(kept[:, None], (GROUPS, SIZE)), (E_BLOCK,))
        choice = tl.where(keep != 0, choice, float("-inf"))
    kk = tl.arange(0, K_BLOCK)
    top_w = tl.zeros((K_BLOCK,), tl.float32)
    top_i = tl.zeros((K_BLOCK,), tl.int64)
    for j in tl.static_range(K):
        top = tl.max(choice, 0)
        pick = tl.min(tl.where(choice == top, e, E_BLOCK), 0)  # ties: the lower index
        weight = tl.sum(tl.where(e == pick, score, 0.0), 0)
        top_w = tl.where(kk == j, weight, top_w)
        top_i = tl.where(kk == j, pick.to(tl.int64), top_i)
        choice = tl.where(e == pick, float("-inf"), choice)
    if RENORM:
        top_w = top_w / (tl.sum(top_w, 0) + renorm_eps)
    top_w = top_w * scaling
    tl.store(ids_ptr + kk, top_i, mask=kk < K)
    tl.store(w_ptr + kk, top_w, mask=kk < K)
    for first in range(0, hidden, H_BLOCK):
        h = first + tl.arange(0, H_BLOCK)
        tl.store(x_out_ptr + h, tl.load(x_ptr + h, mask=h < hidden), mask=h < hidden)
    if SIGNAL:  # after every store, seen system-wide first: the engine reads them once it sees the code
        tl.debug_barrier()
        tl.atomic_xchg(signal_ptr, code, sem="release", scope="sys")


def route_pack(
    logits: torch.Tensor,
    x: torch.Tensor,
    routing: Routing,
    ids_out: torch.Tensor,
    weights_out: torch.Tensor,
    x_out: torch.Tensor,
    bias: torch.Tensor | None = None,
    signal: tuple[torch.Tensor, int] | None = None,
) -> None:
    """logits [E] float32 and x [H] float32 of one token -> ids_out [k] int64 and weights_out
    [k] float32 as `routing` says (bias [E]: DeepSeek-V3's correction), and x_out [H] = x.
    The outputs may be page-locked host memory. signal (word, code): once the outputs are
    visible to the host, the kernel writes code into the int32 word (a mailbox's request,
    tandem.gpu.mailbox)."""
    n_experts, hidden = logits.numel(), x.numel()
    if not routing.supported(n_experts):
        raise ValueError(f"route_pack: {routing} does not take {n_experts} experts")
    _route_pack_kernel[(1,)](
        logits, bias if bias is not None else logits, x, ids_out, weights_out, x_out,
        signal[0] if signal is not None else ids_out, signal[1] if signal is not None else 0, n_experts, hidden,
        float(routing.scaling), float(routing.renorm_eps),
        K=routing.top_k, RENORM=routing.renormalize, SIGMOID=routing.sigmoid, HAS_BIAS=bias is not None,
        GROUPS=routing.groups, TOPK_GROUP=routing.topk_group, GROUP_TOP2=routing.group_top2,
        SIGNAL=signal is not None,
        E_BLOCK=triton.next_power_of_2(n_experts), K_BLOCK=triton.next_power_of_2(routing.top_k),
        H_BLOCK=min(4096, triton.next_power_of_2(hidden)), num_warps=4,
    )  # fmt: skip


def route_pack_reference(logits, x, routing, ids_out, weights_out, x_out, bias=None, signal=None):
    """The routers' torch calls (transformers' Qwen3-MoE, DeepSeek-V2 and -V3 routers) on one token."""
    logits = logits.float().view(1, -1)
    n_experts = logits.shape[1]
    scores = logits.sigmoid() if routing.sigmoid else torch.softmax(logits, dim=-1)
    choice = scores + bias if bias is not None else scores
    if routing.groups > 1:
        grouped = choice.view(1, routing.groups, n_experts // routing.groups)
        group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if routing.group_top2 else grouped.max(-1).values
        kept = torch.topk(group_scores, routing.topk_group, dim=-1)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(1, n_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = torch.topk(choice, routing.top_k, dim=-1)[1]
    top = scores.gather(1, ids)
    if routing.renormalize:
        top = top / (top.sum(dim=-1, keepdim=True) + routing.renorm_eps)
    ids_out.copy_(ids.view(-1))
    weights_out.copy_((top * routing.scaling).view(-1))
    x_out.copy_(x)
    if signal is not None:
        signal[0].fill_(signal[1])


@triton.jit
def _expert_sum_kernel(
    h_ptr, out_ptr, shared_ptr, y_ptr, done_ptr, n, HAS_SHARED: tl.constexpr, CLEAR: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    used = i < n
    # out is where the engine wrote it (host memory): read past the caches, as the host left it
    y = tl.load(h_ptr + i, mask=used, other=0.0) + tl.load(out_ptr + i, mask=used, other=0.0, volatile=True)
    if HAS_SHARED:
        y += tl.load(shared_ptr + i, mask=used, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, y, mask=used)
    if CLEAR:
        tl.store(done_ptr, 0, mask=tl.program_id(0) == 0)


def expert_sum(
    h: torch.Tensor, out: torch.Tensor, shared: torch.Tensor | None = None, done: torch.Tensor | None = None
) -> torch.Tensor:
    """h [n] float32 + out [n] float32 (+ shared [n]) -> y [n] float32 on h's device: a layer's
    residual plus its routed experts' output, read from the page-locked memory the engine
    wrote, plus its shared experts'. done: an int32 word set to 0 (a mailbox's answer,
    taken)."""
    n = h.numel()
    y = torch.empty_like(h, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(n))
    _expert_sum_kernel[(triton.cdiv(n, block),)](
        h, out, shared if shared is not None else h, y, done if done is not None else h, n,
        HAS_SHARED=shared is not None, CLEAR=done is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return y


def expert_sum_reference(h, out, shared=None, done=None):
    y = h.float() + out.to(h.device).float()
    if shared is not None:
        y += shared.float()
    if done is not None:
        done.zero_()
    return y
