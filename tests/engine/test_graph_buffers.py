"""A later generation's cache moves onto the buffers a decode graph was captured on
(tandem.engine.graph_decode), so that the graph replays without a new capture. The
logic runs on CPU tensors here; tests/gpu/test_graph_decode.py replays it on a GPU."""

from __future__ import annotations

import weakref

import torch

from tandem.engine.graph_decode import GraphDecode
from tandem.engine.kv_cache import GrowingLayer


class _Cache:
    def __init__(self, rows: list[int], fill: float, n_layers: int = 2):
        self.layers = []
        for n in rows[:n_layers]:
            layer = GrowingLayer()
            k = torch.full((1, 2, n, 4), fill)
            layer.update(k, k + 1)
            self.layers.append(layer)


def captured_on(cache: _Cache) -> GraphDecode:
    """A GraphDecode as it stands after capturing on `cache` (no GPU, no model)."""
    graph = object.__new__(GraphDecode)
    graph.graph = object()
    graph.buffers = [(layer._k, layer._v) for layer in cache.layers]
    graph.owner = None
    return graph


def test_a_new_cache_moves_onto_the_captured_buffers_and_the_old_one_keeps_its_rows():
    old = _Cache([5, 5], fill=1.0)
    for layer in old.layers:
        layer.reserve(40)
    graph = captured_on(old)
    graph.owner = weakref.ref(old)
    new = _Cache([3, 3], fill=7.0)
    graph.reserve(new, 20)
    for layer, (k, v) in zip(new.layers, graph.buffers, strict=True):
        assert layer._k is k and layer._v is v
        assert layer.length == 3 and torch.equal(layer.keys, torch.full((1, 2, 3, 4), 7.0))
        assert torch.equal(layer.values, torch.full((1, 2, 3, 4), 8.0))
    for layer, (k, _) in zip(old.layers, graph.buffers, strict=True):  # copies, with its own rows
        assert layer._k is not k and torch.equal(layer.keys, torch.full((1, 2, 5, 4), 1.0))
    assert graph.owner() is new


def test_a_cache_needing_more_room_than_the_buffers_keeps_its_own():
    old = _Cache([5, 5], fill=1.0)
    graph = captured_on(old)  # room for 5 + the cache's headroom
    room = old.layers[0]._k.shape[2]
    new = _Cache([3, 3], fill=7.0)
    graph.reserve(new, room + 1)
    assert all(layer._k is not k for layer, (k, _) in zip(new.layers, graph.buffers, strict=True))
    assert new.layers[0]._k.shape[2] >= room + 1


def test_other_shapes_keep_their_own_buffers():
    graph = captured_on(_Cache([5, 5], fill=1.0))
    other = _Cache([3], fill=2.0, n_layers=1)
    graph.reserve(other, 10)
    assert other.layers[0]._k is not graph.buffers[0][0]
