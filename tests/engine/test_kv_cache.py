"""GrowingLayer against Hugging Face's DynamicLayer and WindowLayer against its DynamicSlidingWindowLayer:
same keys and values, appends without re-copying, sliding layers bounded by their window."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tandem.engine import kv_cache
from tandem.engine.kv_cache import HEADROOM, GrowingLayer, WindowLayer, new_cache
from tandem.engine.model_io import cache_kwarg
from tandem.inject.model import load_model
from tandem.synth.tiny import write_tiny


def kv(n: int, seed: int, heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, n, dim, generator=g)


def test_appends_equal_dynamic_layer_and_grow_by_doubling():
    grow, ref = GrowingLayer(), DynamicLayer()
    buffers = set()
    for step, n in enumerate([5, 1, 1, 70, 1, 200, 3]):
        k, v = kv(n, step)
        a, b = grow.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert grow.get_seq_length() == ref.get_seq_length()
        buffers.add(grow._k.data_ptr())
    assert grow._k.shape[2] >= grow.length
    assert len(buffers) <= 3  # 261 -> 537: a reallocation per doubling at most, not per append


def test_next_row_and_advance_write_in_place():
    layer = GrowingLayer()
    k, v, pos = layer.next_row(2, 8)  # an empty layer: allocated on first use, for its row and HEADROOM more
    assert pos == 0 and k.shape == (1, 2, 1 + HEADROOM, 8)
    k[:, :, 0] = 1.0
    v[:, :, 0] = 2.0
    layer.advance()
    assert layer.get_seq_length() == 1 and layer.keys.shape == (1, 2, 1, 8)
    assert bool((layer.keys == 1).all()) and bool((layer.values == 2).all())
    k2, v2 = kv(HEADROOM, 3)
    layer.update(k2, v2)
    assert layer._k.data_ptr() == k.data_ptr()  # it fitted
    k3, _, pos = layer.next_row(2, 8)  # full: the buffer grows and keeps what it had
    assert pos == 1 + HEADROOM and k3.shape[2] == 2 * HEADROOM + 2
    assert torch.equal(layer.keys[:, :, 1:], k2)


def test_a_prompt_allocates_its_buffers_once(monkeypatch):
    made = []
    new_zeros = torch.Tensor.new_zeros
    monkeypatch.setattr(
        torch.Tensor, "new_zeros", lambda self, *a, **kw: made.append(a) or new_zeros(self, *a, **kw)
    )
    layer = GrowingLayer()
    k, v = kv(512, 4)
    layer.update(k, v)  # the first write sizes the buffers: no empty allocation before it
    assert len(made) == 2  # keys and values, once each
    assert layer._k.shape[2] == 512 + HEADROOM and torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_room_a_reserve_adds_is_zero_and_a_graph_step_writes_at_its_position():
    layer = GrowingLayer()
    k = torch.randn(1, 2, 3, 4)
    layer.update(k, k + 1)
    for _ in range(3):  # memory the allocator may hand back: NaN left in it must not show
        poison = torch.full((1, 2, 4000 + HEADROOM, 4), float("nan"))  # the size reserve takes
        del poison
    layer.reserve(4000)
    keys, values = layer._k, layer._v
    assert keys.shape[2] >= 4000 and torch.equal(keys[:, :, :3], k)
    assert not keys[:, :, 3:].any() and not values[:, :, 3:].any()
    # A captured step's update: write at the device position, hand back the whole buffers.
    layer.graph_position = torch.tensor([3])
    new = torch.randn(1, 2, 1, 4)
    full_k, full_v = layer.update(new, new * 2)
    layer.graph_position = None
    assert full_k.data_ptr() == keys.data_ptr() and full_k.shape == keys.shape
    assert torch.equal(full_k[:, :, 3:4], new) and torch.equal(full_v[:, :, 3:4], new * 2)
    assert layer.length == 3  # the step's caller advances it
    layer.advance()
    assert torch.equal(layer.keys[:, :, 3:], new)


def test_crop_reset_and_reorder():
    layer = GrowingLayer()
    k, v = kv(10, 1)
    layer.update(k, v)
    layer.crop(-3)
    assert layer.get_seq_length() == 7 and torch.equal(layer.keys, k[:, :, :7])
    with pytest.raises(ValueError):
        layer.crop(2)
    layer.reorder_cache(torch.tensor([0]))
    assert torch.equal(layer.values, v[:, :, :7])
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape == (2, 2, 7, 8)
    layer.reset()
    assert layer.get_seq_length() == 0


def test_a_different_shape_is_an_error_not_lost_data():
    layer = GrowingLayer()
    layer.update(*kv(4, 0))
    with pytest.raises(ValueError, match="do not fit"):
        layer.update(*kv(1, 1, heads=3))


@pytest.fixture
def small_margin(monkeypatch):
    """Buffers with 3 positions to spare: windows move to the front every few tokens."""
    monkeypatch.setattr(kv_cache, "HEADROOM", 3)
    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 4)


def test_window_layer_equals_dynamic_sliding_window_layer(small_margin):
    window = 6
    layer, ref = WindowLayer(window), DynamicSlidingWindowLayer(window)
    moves = 0
    for step, n in enumerate([3, 1, 1, 1, 1, 9, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1]):
        for q in (1, n):
            assert layer.get_mask_sizes(q) == ref.get_mask_sizes(q)
        k, v = kv(n, step)
        before = layer._k.data_ptr() if layer._k is not None else None
        got, want = layer.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
        assert layer.get_seq_length() == ref.get_seq_length()
        moves += before == layer._k.data_ptr() and layer.length < got[0].shape[2] + 3
        # The buffer holds the window and the margin (or a prompt chunk that came at once).
        assert layer._k.shape[2] <= max(window - 1 + n, 2 * (window - 1)) + 3 + window
    assert moves > 0  # the window moved to the front of its buffer at least once


def test_window_layer_rows_for_the_fused_layers_keep_the_window_in_order(small_margin):
    window = 5
    layer = WindowLayer(window)
    written = []
    for i in range(20):
        k, v, row = layer.next_row(1, 2)
        k[:, :, row] = float(i)
        v[:, :, row] = -float(i)
        layer.advance()
        written.append(float(i))
        kept = written[-(window - 1) :]
        assert layer.get_seq_length() == i + 1 and layer.attended() == len(kept)
        assert layer.keys[0, 0, :, 0].tolist() == kept and layer.values[0, 0, :, 1].tolist() == [
            -x for x in kept
        ]
        assert layer._k.shape[2] <= window - 1 + 1 + 3 + window


def test_window_layer_crop_within_what_it_kept():
    layer = WindowLayer(4)
    layer.update(*kv(10, 0))
    layer.crop(-2)
    assert layer.get_seq_length() == 8
    with pytest.raises(ValueError, match="past the positions it kept"):
        layer.crop(-5)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_sliding_window_layers_keep_their_window_and_give_the_same_logits(
    tmp_path, monkeypatch, small_margin, fused
):
    monkeypatch.setenv("TANDEM_CPU_FUSED_DECODE", fused)  # "0": Hugging Face's masks and modules alone
    loaded = load_model(write_tiny("gemma3", tmp_path / "g.gguf", "F16"), progress=False)
    model = loaded.model
    assert model.config.sliding_window == 8 and "sliding_attention" in model.config.layer_types
    cache = new_cache(model)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [
        WindowLayer if t == "sliding_attention" else GrowingLayer for t in model.config.layer_types
    ]
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(input_ids=ids).logits[0]  # prefill alone: the sliding mask over the whole prompt
        steps = [model(input_ids=ids[:, :6], **{cache_kwarg(model): cache}, use_cache=True).logits[0, -1]]
        for t in range(6, 40):  # decode steps well past the window, the windows moving often
            steps.append(
                model(input_ids=ids[:, t : t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits[
                    0, -1
                ]
            )
    for got, want in zip(steps, whole[5:], strict=True):
        assert float((got - want).norm() / want.norm()) < 1e-5
    assert getattr(model.forward, "calls", 0) == (34 if fused == "1" else 0)  # the fast one-token steps
    for layer in cache.layers:
        if isinstance(layer, WindowLayer):  # the window, not the 40 positions
            assert layer.attended() == 7 and layer._k.shape[2] <= 7 + 1 + 3 + 8


def test_a_step_outside_update_gets_its_position_and_mask_check():
    layer = GrowingLayer()
    layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    position, eager = layer.step_position(torch.device("cpu"))
    assert eager and position.tolist() == [3] and layer._k.shape[2] >= 4 and layer.length == 3
    assert layer.sees_every_row(None) and layer.sees_every_row(torch.ones(1, 1, 1, 4, dtype=torch.bool))
    hidden = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    hidden[..., 1] = False
    assert not layer.sees_every_row(hidden)
    assert not layer.sees_every_row(torch.ones(1, 1, 1, 5, dtype=torch.bool))  # another length
    assert not layer.sees_every_row(torch.zeros(1, 1, 1, 4))  # an additive mask
    layer.graph_position = torch.tensor([7])  # a captured step: its mask is its position's
    position, eager = layer.step_position(torch.device("cpu"))
    assert not eager and position is layer.graph_position and layer.sees_every_row(hidden)
