"""The KV cache tandem generates with: Hugging Face's DynamicCache with growable full-attention layers.

DynamicCache appends a token's keys and values with torch.cat, which copies the
layer's whole cache every step: O(context) per token per layer. GrowingLayer keeps
them in buffers with spare room that double when full, so an append copies only
the new rows, and the fused CPU decode layers (tandem.ops.decode_layer_cpu) write
a step's key and value straight into the buffer.

Sliding-window layers become WindowLayers: they keep the last window - 1 positions
(what the next query can see) plus a margin, as Hugging Face's DynamicSlidingWindowLayer
does, and hand attention the same keys and values and mask sizes. When the margin is
used up, the last window - 1 positions move to the front of the buffer: one copy of a
window per HEADROOM tokens, where DynamicSlidingWindowLayer concatenates every step.
The fused layers write into them too, at a buffer index that is no longer the position.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

MIN_CAPACITY = 64
HEADROOM = 256  # positions allocated past the ones a growth needs


def same_kind(k: torch.Tensor, v: torch.Tensor, like_k: torch.Tensor, like_v: torch.Tensor) -> bool:
    """Whether key/value buffers k, v can hold rows shaped like like_k, like_v (any length)."""
    return (
        k.shape[:2] == like_k.shape[:2]
        and k.shape[3] == like_k.shape[3]
        and v.shape[3] == like_v.shape[3]
        and k.dtype == like_k.dtype
        and k.device == like_k.device
    )


class GrowingLayer(DynamicLayer):
    """A full-attention layer's keys and values [B, H, capacity, D]; `keys`/`values` view the filled part."""

    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    length = 0
    # Set for a captured decode step: the new position as a device tensor [1]. update() then
    # writes there and returns the whole buffers, whose unwritten rows the step's mask hides,
    # and the caller advances the length after the step.
    graph_position: torch.Tensor | None = None

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
        self._k = self._v = None  # allocated by the first write, at its size (a prompt's, plus HEADROOM)
        self.length = 0
        self.is_initialized = True

    def _reserve(self, end: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Room for `end` positions in buffers shaped like like_k / like_v (except the length)."""
        k, v = self._k, self._v
        fits = k is not None and same_kind(k, v, like_k, like_v)
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
        # Zeros, not whatever the allocator hands back: a captured decode step (graph_decode.py)
        # attends over the whole buffer with the unwritten rows masked, and a masked row's
        # zero weight times a NaN left in memory would still be NaN.
        new_k = like_k.new_zeros(b, h, capacity, like_k.shape[3])
        new_v = like_v.new_zeros(b, h, capacity, like_v.shape[3])
        if self.length:
            new_k[:, :, : self.length] = k[:, :, : self.length]
            new_v[:, :, : self.length] = v[:, :, : self.length]
        self._k, self._v = new_k, new_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.graph_position is not None:  # a captured decode step (tandem.engine.graph_decode)
            self._k.index_copy_(2, self.graph_position, key_states)
            self._v.index_copy_(2, self.graph_position, value_states)
            return self._k, self._v
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end, key_states, value_states)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        return self.keys, self.values

    def attended(self) -> int:
        """Cached positions the next query's attention reads (all of them here)."""
        return self.length

    def next_row(self, n_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Buffers (float32, batch 1) with room for one more position, and that position.

        For a writer outside `update` (the fused decode layers), which then calls advance().
        """
        like = torch.empty(1, n_kv_heads, 0, head_dim, dtype=torch.float32)
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        self._reserve(self.length + 1, like, like)
        return self._k, self._v, self.length

    def sees_every_row(self, mask) -> bool:
        """Whether a one-token step with this attention mask attends to every cached position
        and its own: no mask, a captured step's (its position's), or a boolean one all true."""
        if mask is None or self.graph_position is not None:
            return True
        return (
            isinstance(mask, torch.Tensor)
            and mask.dtype == torch.bool
            and mask.shape[-1] == self.length + 1
            and mask.numel() == mask.shape[-1]
            and bool(mask.all())
        )

    def step_position(self, device: torch.device) -> tuple[torch.Tensor, bool]:
        """Where a one-token step written outside `update` goes, as an int64 [1] on `device`:
        a captured step's position (its caller advances the cache), or else the next row,
        with room reserved; True then: call advance() after writing it."""
        if self.graph_position is not None:
            return self.graph_position, False
        self.reserve(self.length + 1)
        return torch.tensor([self.length], device=device), True

    def reserve(self, end: int) -> None:
        """Room for `end` positions without moving the buffers again (before a captured step)."""
        if self._k is not None:
            self._reserve(end, self._k, self._v)

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


class WindowLayer(GrowingLayer):
    """A sliding-window layer: DynamicSlidingWindowLayer's contract over a GrowingLayer's buffer.

    `length` counts the positions in the buffer (its last ones are the newest),
    `cumulative_length` every position seen. Attention gets the last
    min(cumulative, window - 1) cached positions and the new ones, as Hugging Face's
    layer returns and its mask sizes say.
    """

    is_sliding = True

    def __init__(self, sliding_window: int):
        super().__init__()
        if sliding_window < 2:
            raise ValueError(f"sliding window of {sliding_window} positions: at least 2 expected")
        self.sliding_window = sliding_window
        self.cumulative_length = 0

    def _kept(self) -> int:
        return min(self.length, self.sliding_window - 1)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, self.length - self._kept() : self.length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        GrowingLayer.keys.fset(self, value)
        self.cumulative_length = self.length

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, self.length - self._kept() : self.length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        GrowingLayer.values.fset(self, value)

    def _make_room(self, n: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Room for n more positions: first by dropping positions no query will see again."""
        if (
            self._k is not None
            and self.length + n > self._k.shape[2]
            and self.length > self.sliding_window - 1
        ):
            keep = self.sliding_window - 1
            self._k[:, :, :keep] = self._k[:, :, self.length - keep : self.length].clone()
            self._v[:, :, :keep] = self._v[:, :, self.length - keep : self.length].clone()
            self.length = keep
        self._reserve(self.length + n, like_k, like_v)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        visible = self._kept() + n
        self._make_room(n, key_states, value_states)
        end = self.length + n
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.cumulative_length += n
        return self._k[:, :, end - visible : end], self._v[:, :, end - visible : end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Hugging Face's rule: the keys a query sees and the position of the first."""
        window = self.sliding_window
        offset = max(self.cumulative_length - window + 1, 0)
        if self.cumulative_length >= window:
            return window - 1 + query_length, offset
        return self.cumulative_length + query_length, offset

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.sliding_window

    def attended(self) -> int:
        return self._kept()

    def next_row(self, n_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        like = torch.empty(1, n_kv_heads, 0, head_dim, dtype=torch.float32)
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        self._make_room(1, like, like)
        return self._k, self._v, self.length

    def advance(self) -> None:
        self.length += 1
        self.cumulative_length += 1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if (
            tokens_to_remove
            and self.cumulative_length + tokens_to_remove < self.cumulative_length - self._kept()
        ):
            raise ValueError("a sliding-window layer cannot go back past the positions it kept")
        if self.is_initialized and tokens_to_remove:
            self.length += tokens_to_remove
            self.cumulative_length += tokens_to_remove

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0

    def _replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        seen = self.cumulative_length  # (the batch operations keep the positions)
        super()._replace(keys, values)
        self.cumulative_length = seen

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.cumulative_length = 0


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty cache for `model`: layer kinds from its config, attention layers growable,
    sliding-window layers kept to their window."""
    cache = DynamicCache(config=model.config)
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layers.append(GrowingLayer())
        elif type(layer) is DynamicSlidingWindowLayer:
            layers.append(WindowLayer(layer.sliding_window))
        else:
            layers.append(layer)
    cache.layers = layers
    return cache
