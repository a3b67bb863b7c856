"""Scaled-dot-product attention for models whose attention runs on the CPU.

Hugging Face's "sdpa" attention repeats every key/value head for each query
head of its group before calling torch (only newer transformers releases avoid
it, and only for some cases), which at decode copies the whole KV cache once
per layer per token: 5.7× slower than torch's own grouped-query path at a
512-token context on one thread. This implementation passes the grouped heads
to torch as they are (`enable_gqa`); on other devices it defers to Hugging
Face's. A decode step (one query position, no mask) of a model on the CPU engine
runs on the engine's pool instead of torch's single decode thread, and so does a
prompt's causal attention from ENGINE_PROMPT_MIN positions on: against itself, after a
cached prefix, within a sliding window, whenever the mask is exactly that. Models are built with it by name
(`attn_implementation=IMPLEMENTATION`). On a CUDA GPU a decode step (one query
position) runs tandem's split-key kernel (tandem.gpu.decode_attention), unless
$TANDEM_GPU_ATTENTION=torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from tandem.cpu.engine import default_engine
from tandem.env_switches import choice

IMPLEMENTATION = "tandem_sdpa"
# Set on a model's config when its CPU operators run on the engine: decode steps'
# attention then runs there too (split over heads and positions on the pool) instead of torch's
# single decode thread.
ENGINE_FLAG = "tandem_engine_attention"
# Prompt positions from which a causal prompt's attention runs on the engine (below, torch's
# SDPA was as fast or faster on two cores: 64 positions of Gemma 3 270M's heads).
ENGINE_PROMPT_MIN = 128
# A decode step's attention on a CUDA GPU runs tandem's split-key kernel
# (tandem.gpu.decode_attention); "torch" keeps Hugging Face's SDPA path.
GPU_ATTENTION_ENV = "TANDEM_GPU_ATTENTION"


# The last mask checked (held, so that its memory is not reused meanwhile), its place and
# the answer: a forward hands the same mask to every layer of a kind (sliced into a new
# view each time), so each is compared once, not once per layer.
_last_checked: tuple[torch.Tensor, tuple, bool] | None = None


def is_causal_mask(mask: torch.Tensor, q_len: int, k_len: int, window: int) -> bool:
    """Whether a boolean mask [1, 1, q_len, k_len] lets query i (at key index k_len - q_len + i)
    see exactly keys j <= that index, and with a window only j > index - window."""
    global _last_checked
    if mask.dtype != torch.bool or mask.shape != (1, 1, q_len, k_len) or q_len > k_len:
        return False
    place = (mask.data_ptr(), mask.stride(), window)
    if _last_checked is not None and _last_checked[1] == place and _last_checked[0].shape == mask.shape:
        return _last_checked[2]
    i = torch.arange(q_len, device=mask.device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=mask.device)[None, :]
    expected = j <= i
    if window > 0:
        expected &= j > i - window
    answer = torch.equal(mask[0, 0], expected)
    _last_checked = (mask, place, answer)
    return answer


def engine_prompt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    window: int = 0,
    causal: bool = True,
) -> torch.Tensor | None:
    """A prompt of ENGINE_PROMPT_MIN positions or more on the engine's flash-style kernel:
    without a mask when `causal` and the keys are the prompt's own, else when the boolean
    mask [1, 1, T, K] is exactly causal (after a cached prefix, within `window`).
    -> [1, T, Hq, Dv], or None where that does not apply (the caller computes it itself)."""
    t, k_len = query.shape[2], key.shape[2]
    if t < ENGINE_PROMPT_MIN:
        return None
    plain = mask is None and causal and t == k_len
    if not plain and (mask is None or not is_causal_mask(mask, t, k_len, window)):
        return None
    return default_engine().attention_prefill(query, key, value, scale, 0 if plain else window)


def gpu_kernel_enabled() -> bool:
    return choice(GPU_ATTENTION_ENV, ("tandem", "torch"), "tandem") == "tandem"


def grouped_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, Tq, D]
    key: torch.Tensor,  # [B, Hkv, Tk, D]
    value: torch.Tensor,  # [B, Hkv, Tk, Dv]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    special = (
        kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("s_aux") is not None
    )
    if (
        query.device.type == "cuda"
        and not special
        and not (module.training and dropout)
        and gpu_kernel_enabled()
    ):
        from tandem.gpu.decode_attention import decode_attention, supported

        if supported(query, key, value, attention_mask):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return decode_attention(query, key, value, attention_mask, scale), None
    if query.device.type != "cpu" or special or query.shape[1] % key.shape[1]:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    if (
        query.shape[2] == 1
        and attention_mask is None
        and not (module.training and dropout)
        and getattr(getattr(module, "config", None), ENGINE_FLAG, False)
    ):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = default_engine().attention_decode(query, key, value, scale)
        if out is not None:
            return out, None
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = query.shape[2] > 1 and attention_mask is None and causal
    if not (module.training and dropout) and getattr(getattr(module, "config", None), ENGINE_FLAG, False):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        window = int(kwargs.get("sliding_window") or 0)
        out = engine_prompt_attention(query, key, value, attention_mask, scale, window, causal)
        if out is not None:
            return out, None
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # [B, Hq, Tq, Dv]
    return out.transpose(1, 2).contiguous(), None  # [B, Tq, Hq, Dv]


AttentionInterface.register(IMPLEMENTATION, grouped_sdpa_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
