"""The pieces of DeepSeek MLA that do not hold weights: rope forms, softmax scale, masks, attention."""

from __future__ import annotations

import math

import torch


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN magnitude correction for a context stretched by `scale`."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config, qk_head_dim: int) -> float:
    """qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's reference).

    The other YaRN factor, mscale / mscale_all_dim, is already in the rotary cos/sin that the
    model hands every layer, so only this one belongs to the attention.
    """
    scale = qk_head_dim**-0.5
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    mscale_all_dim = rope.get("mscale_all_dim", 0)
    if rope_type != "default" and mscale_all_dim:
        m = yarn_get_mscale(rope["factor"], mscale_all_dim)
        scale = scale * m * m
    return scale


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, position_embeddings, interleave: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, H, T, R] and k [B, 1, T, R] by the model's position embeddings.

    Three layouts, exactly as transformers lays them out (the cache keeps rotated keys, so
    the plain and absorbed forms must agree with it):
    - DeepSeek-V2 hands a complex tensor freqs_cis [B, T, R/2]: pairs (x0, x1), (x2, x3)...
      rotate in place and stay interleaved;
    - DeepSeek-V3 hands (cos, sin) [B, T, R]; with `rope_interleave` the pairs are the same
      but the result is laid out as (evens, odds);
    - without it, the halves (x[:R/2], x[R/2:]) rotate (rotate_half).
    """
    if isinstance(position_embeddings, torch.Tensor):
        if not position_embeddings.is_complex():
            raise ValueError("MLA: a tensor position embedding must be DeepSeek-V2's complex freqs_cis")
        freqs = position_embeddings.to(q.device).unsqueeze(1)  # [B, 1, T, R/2]

        def rot(x):
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs).flatten(3).type_as(x)

        return rot(q), rot(k)
    cos, sin = (t.to(q.device) for t in position_embeddings)
    if interleave:
        cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)  # [B, 1, T, R/2]
        sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)

        def rot(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

        return rot(q), rot(k)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, R]

    def rot(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    return rot(q), rot(k)


def mask_bias(mask, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """The model's attention mask as an additive float32 bias broadcastable to [B, H, q, kv].

    None follows transformers' SDPA convention: causal from the top-left when q_len > 1
    (the model passes None only when q_len == kv_len, or for a first chunk into a static
    cache), nothing to mask for a single query.
    """
    if mask is None:
        if q_len == 1:
            return None
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(kv_len, device=device)[None, :]
        return torch.zeros(q_len, kv_len, device=device).masked_fill(j > i, torch.finfo(torch.float32).min)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"MLA: unsupported attention mask type {type(mask).__name__} (use eager or sdpa masks)"
        )
    mask = mask[..., -q_len:, :kv_len].to(device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask.float()


def attend(scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys in float32: [B, H, q, kv] scaled scores -> probabilities, in the
    scores' dtype (the float32 bias does not promote them)."""
    dtype = scores.dtype
    if bias is not None:
        scores = scores.float() + bias
    return torch.softmax(scores.float(), dim=-1).to(dtype)
