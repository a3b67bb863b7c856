"""The KV cache tandem generates with: Hugging Face's DynamicCache with growable full-attention layers.

DynamicCache appends a token's keys and values with torch.cat, which copies the
layer's whole cache every step: O(context) per token per layer. GrowingLayer keeps
them in buffers with spare room that double when full, so an append copies only
the new rows, and the fused CPU decode layers (tandem.ops.decode_layer_cpu) write
a step's key and value straight into the buffer.

Sliding-window layers become growable layers too and keep every position: the
attention mask Hugging Face builds for them (and the fused layers' own window)
limits what attention reads, and the fused layers can write into them. The cost
is memory: such a layer holds the whole context, not the last window.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

MIN_CAPACITY = 64
HEADROOM = 256  # positions allocated past the ones a growth needs


class GrowingLayer(DynamicLayer):
    """A full-attention layer's keys and values [B, H, capacity, D]; `keys`/`values` view the filled part."""

    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    length = 0

    # The filled part, as views made on access: a decode step then only counts a position.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:  # Hugging Face's own code assigns whole tensors
        self._k = None if value is None else value.contiguous()
        self.length = 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = None if value is None else value.contiguous()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = self._v = None
        self.length = 0
        self.is_initialized = True
        self._reserve(0, key_states, value_states)

    def _reserve(self, end: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Room for `end` positions in buffers shaped like like_k / like_v (except the length)."""
        k, v = self._k, self._v
        fits = (
            k is not None
            and k.shape[:2] == like_k.shape[:2]
            and k.shape[3] == like_k.shape[3]
            and v.shape[3] == like_v.shape[3]
            and k.dtype == like_k.dtype
            and k.device == like_k.device
        )
        if fits and k.shape[2] >= end:
            return
        if not fits and self.length:
            raise ValueError(
                f"KV cache: keys {tuple(like_k.shape)} do not fit the cached {tuple(k.shape)} (batch, heads or size)"
            )
        # Doubling, and room for a reply past a prompt: the first decode step after a
        # 512-token prompt would otherwise copy every layer's cache.
        capacity = max(end + HEADROOM, 2 * k.shape[2] if fits else 0, MIN_CAPACITY)
        b, h = like_k.shape[:2]
        new_k = like_k.new_empty(b, h, capacity, like_k.shape[3])
        new_v = like_v.new_empty(b, h, capacity, like_v.shape[3])
        if self.length:
            new_k[:, :, : self.length] = k[:, :, : self.length]
            new_v[:, :, : self.length] = v[:, :, : self.length]
        self._k, self._v = new_k, new_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end, key_states, value_states)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        return self.keys, self.values

    def next_row(self, n_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Buffers (float32, batch 1) with room for one more position, and that position.

        For a writer outside `update` (the fused decode layers), which then calls advance().
        """
        like = torch.empty(1, n_kv_heads, 0, head_dim, dtype=torch.float32)
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        self._reserve(self.length + 1, like, like)
        return self._k, self._v, self.length

    def advance(self) -> None:
        """One more position was written at next_row()'s position."""
        self.length += 1

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        self.is_initialized = False

    def _replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._replace(
                self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._replace(self.keys[indices, ...], self.values[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            beam_idx = beam_idx.to(self.keys.device)
            self._replace(self.keys.index_select(0, beam_idx), self.values.index_select(0, beam_idx))


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty cache for `model`: layer kinds from its config, attention layers growable."""
    cache = DynamicCache(config=model.config)
    growable = (DynamicLayer, DynamicSlidingWindowLayer)
    cache.layers = [GrowingLayer() if type(layer) in growable else layer for layer in cache.layers]
    return cache
