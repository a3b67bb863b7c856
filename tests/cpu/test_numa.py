"""NUMA node groups: the pool's threads by node, each group's rows of every matrix.

A machine of one node has one group, and every op runs as it always did. With
TANDEM_CPU_NUMA=N (N >= 2) the pool splits its threads into N groups on any machine:
the one-token loops then hand out their tasks node by node (each group its own rows
first, then the others'), and ops move each group's pages to its group's node (here
all the same node). Each output row is still one kernel's dot and each sum still runs
in slot order, so every result must equal one group's bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

import tandem.cpu.engine as engine_module
from tandem.cpu.engine import NUMA_ENV, CPUEngine, _native, numa_groups
from tandem.engine.kv_cache import new_cache
from tandem.engine.model_io import cache_kwarg
from tandem.errors import TandemError
from tandem.inject.model import load_model
from tandem.synth.tiny import write_tiny
from tests.cpu.test_engine_ops import E, expert_set, quant, routing

GROUPS = [(2, 2), (3, 2), (3, 3), (5, 2), (5, 4)]  # (threads, simulated nodes)


def make(threads: int, groups: int) -> CPUEngine:
    return CPUEngine(threads=threads, variant=None, prefill="off", pin=False, node_groups=groups)


def test_the_pool_groups_its_threads_as_asked(monkeypatch):
    auto = CPUEngine(threads=2, variant=None, prefill="off").pool.node_groups
    assert sum(n for _, n in auto) == 2 and all(node >= 0 for node, _ in auto)
    assert make(5, 1).pool.node_groups == [(0, 5)]
    assert [n for _, n in make(5, 2).pool.node_groups] == [2, 3]
    assert [n for _, n in make(3, 8).pool.node_groups] == [1, 1, 1]  # no empty group
    for raw, groups in [("", 0), ("auto", 0), ("off", 1), ("1", 1), ("4", 4)]:
        monkeypatch.setenv(NUMA_ENV, raw)
        assert numa_groups() == groups
    for bad in ("two", "-2", "5000"):
        monkeypatch.setenv(NUMA_ENV, bad)
        with pytest.raises(TandemError, match=NUMA_ENV):
            CPUEngine(threads=2, variant=None, prefill="off")


@pytest.mark.parametrize(("threads", "groups"), GROUPS)
def test_row_edges_follow_the_threads_of_each_group(threads, groups):
    pool = make(threads, groups).pool
    sizes = [n for _, n in pool.node_groups]
    for rows in (1, 16, 100, 768, 2048, 151936):
        edges = [_native().node_row_edge(pool, rows, g) for g in range(len(sizes) + 1)]
        assert edges[0] == 0 and edges[-1] == rows
        assert edges == sorted(edges)
        assert all(e % 16 == 0 for e in edges[:-1])
        for g, n in enumerate(sizes):  # a share of the rows within 16 of the group's share of threads
            assert abs(edges[g + 1] - edges[g] - rows * n / threads) <= 16


@pytest.mark.parametrize(("threads", "groups"), GROUPS)
@pytest.mark.parametrize(
    "types", [(T.Q8_0, T.Q8_0), (T.Q4_K, T.Q6_K)], ids=lambda t: f"{t[0].name}-{t[1].name}"
)
def test_one_token_experts_are_the_same_bits_on_every_grouping(threads, groups, types):
    gate, up, down = expert_set(types, seed=21)
    x, ids, weights = routing(1, 4, seed=22)
    ids[0, 2] = E  # a dropped slot
    ids[0, 3] = ids[0, 0]  # one expert in two slots
    one = make(threads, 1).experts(gate, up, down)(x, ids, weights)
    grouped = make(threads, groups).experts(gate, up, down)
    for _ in range(3):
        torch.testing.assert_close(grouped(x, ids, weights), one, rtol=0, atol=0)
    x, ids, weights = routing(40, 4, seed=23)  # a prompt's call: the same op, node groups or not
    torch.testing.assert_close(
        grouped(x, ids, weights), make(threads, 1).experts(gate, up, down)(x, ids, weights), rtol=0, atol=0
    )


@pytest.mark.parametrize(("threads", "groups"), GROUPS)
@pytest.mark.parametrize("n_tok", [1, 3])
def test_linear_calls_are_the_same_bits_on_every_grouping(threads, groups, n_tok):
    weight = quant(T.Q4_K, (300, 512), seed=24)
    x = torch.randn(n_tok, 512, generator=torch.Generator().manual_seed(25))
    expected = make(threads, 1).linear(weight)(x)
    torch.testing.assert_close(make(threads, groups).linear(weight)(x), expected, rtol=0, atol=0)


def test_many_one_token_calls_on_simulated_nodes_neither_hang_nor_drift():
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=26)
    experts = make(3, 3).experts(gate, up, down)
    x, ids, weights = routing(1, 4, seed=27)
    expected = experts(x, ids, weights)
    for _ in range(3000):
        experts.submit(x, ids, weights)
        out = experts.sync()
    assert torch.equal(out, expected)


def test_ops_move_each_groups_rows_to_its_node():
    before_bytes, before_refused = _native().placement_totals()
    weight = quant(T.Q8_0, (4096, 256), seed=28)
    engine = make(4, 2)
    engine.linear(weight)
    moved, refused = _native().placement_totals()
    moved -= before_bytes
    refused -= before_refused
    data = weight.data
    # Every byte of the matrix was asked to move (pages rounded outwards), unless the
    # kernel refused the calls (a kernel without NUMA): then each of them counts.
    assert (moved >= data.numel() and refused == 0) or (moved == 0 and refused >= 1)
    nodes = _native().page_nodes(data.data_ptr(), data.numel())
    if moved and nodes:
        node = engine.pool.node_groups[0][0]  # both simulated groups are on this machine's node
        assert set(nodes) == {node}


@pytest.fixture
def simulated_default_engine(monkeypatch):
    saved = engine_module._default
    yield
    engine_module._default = saved


def test_a_models_decode_steps_are_the_same_bits_on_simulated_nodes(
    tmp_path, monkeypatch, simulated_default_engine
):
    path = tmp_path / "qwen3moe-Q8_0.gguf"
    write_tiny("qwen3moe", path, "Q8_0")
    prompt = torch.randint(3, 400, (1, 9), generator=torch.Generator().manual_seed(29))
    logits = []
    for setting in ("off", "3"):
        monkeypatch.setenv(NUMA_ENV, setting)
        engine_module.configure(threads=3)
        model = load_model(path, progress=False).model
        with torch.inference_mode():
            cache = new_cache(model)
            model(input_ids=prompt, **{cache_kwarg(model): cache}, use_cache=True)
            steps = []
            token = torch.tensor([[17]])
            for _ in range(4):
                calls = model.forward.calls
                out = model(input_ids=token, **{cache_kwarg(model): cache}, use_cache=True)
                assert model.forward.calls == calls + 1  # the fused step
                steps.append(out.logits)
                token = out.logits[:, -1:].argmax(-1)
        logits.append(torch.cat(steps))
    assert torch.equal(logits[0], logits[1])
