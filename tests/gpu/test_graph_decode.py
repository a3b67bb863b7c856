"""Decode steps replayed from a CUDA graph give the tokens of eager steps; hybrid experts run in it."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.engine.generate import PromptCache, prefill_and_generate
from tandem.engine.graph_decode import CHAIN_ENV, GRAPH_ENV
from tandem.engine.sampling import SamplingParams
from tandem.gpu.mailbox import HANDOVER_ENV, HANDOVERS, mailbox_of
from tandem.inject.loader import default_rules
from tandem.inject.model import load_model
from tandem.inject.plan import GIB, RESERVE_FIXED, RESERVE_FRACTION, plan_placement
from tandem.inject.rules import load_rules
from tandem.ops.experts import QuantExperts
from tandem.ops.experts_cpu import ExpertsCPU
from tandem.synth.tiny import write_tiny
from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile

pytestmark = pytest.mark.gpu

MOE_ARCHS = ("qwen3moe", "qwen2moe", "mixtral", "deepseek2")  # shared experts, Mixtral's names, MLA

CTX = 64
PROMPT = [5, 9, 13, 17, 21, 3, 8]


class _Ids:
    def decode(self, ids, **_):
        return "".join(chr(65 + i % 26) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [chr(65 + i % 26) for i in ids]


def experts_on_cpu_budget(path) -> float:
    """A GPU budget (GiB) whose plan keeps every layer's experts on the CPU engine."""
    with GGUFFile.open(path) as gguf:
        config = config_of(gguf)
        rules = load_rules(default_rules(gguf.architecture, gguf.tensors))
        full = plan_placement(gguf, config, rules, 64 * GIB, CTX, reserve=0)
        needed = full.dense_bytes + full.kv_bytes
        budget = math.ceil((needed + RESERVE_FIXED) / (1 - RESERVE_FRACTION)) + 1
        assert plan_placement(gguf, config, rules, budget, CTX).gpu_expert_layers == ()
    return budget / GIB


def generate(model, n: int, monkeypatch, graphs: bool):
    monkeypatch.setenv(GRAPH_ENV, "1" if graphs else "0")
    if hasattr(model, "_tandem_graph_decode"):
        del model._tandem_graph_decode
    return prefill_and_generate(model, _Ids(), PROMPT, n)


def test_a_dense_model_replays_its_step_and_keeps_its_tokens(tmp_path, monkeypatch):
    path = write_tiny("qwen2", tmp_path / "m.gguf", "Q8_0")
    model = load_model(path, device="cuda:0").model
    eager = generate(model, 16, monkeypatch, graphs=False)
    replayed = generate(model, 16, monkeypatch, graphs=True)
    graph = model._tandem_graph_decode
    assert graph.broken is None and graph.captures == 1 and graph.replays == 14  # steps 2..15
    assert replayed.token_ids == eager.token_ids


def test_a_later_generation_replays_the_same_graph_without_a_capture(tmp_path, monkeypatch):
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    hybrid = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
    eager = generate(hybrid, 12, monkeypatch, graphs=False)
    first = generate(hybrid, 12, monkeypatch, graphs=True)
    graph = hybrid._tandem_graph_decode
    second = prefill_and_generate(hybrid, _Ids(), PROMPT, 12)  # a new cache, the same graph
    assert graph.captures == 1 and graph.replays == 10 + 11  # every step of the second one
    assert first.token_ids == second.token_ids == eager.token_ids


def test_a_gpu_models_prompt_in_chunks_gives_the_same_tokens(tmp_path, monkeypatch):
    from tandem.engine import generate as generate_module

    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    hybrid = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
    whole = prefill_and_generate(hybrid, _Ids(), PROMPT, 8).token_ids
    monkeypatch.setattr(generate_module, "GPU_PREFILL_CHUNK", 3)  # 7 prompt tokens: 3 + 3 + 1
    assert prefill_and_generate(hybrid, _Ids(), PROMPT, 8).token_ids == whole


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_hybrid_experts_run_in_the_graph_and_keep_the_tokens(arch, tmp_path, monkeypatch):
    path = write_tiny(arch, tmp_path / "moe.gguf", "Q8_0")
    hybrid = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
    experts = [m for m in hybrid.modules() if isinstance(m, ExpertsCPU)]
    assert experts and all(m.capturable for m in experts)
    eager = generate(hybrid, 12, monkeypatch, graphs=False)
    replayed = generate(hybrid, 12, monkeypatch, graphs=True)
    assert hybrid._tandem_graph_decode.replays == 10
    assert replayed.token_ids == eager.token_ids
    # A second generation on a fresh cache captures again and still agrees.
    again = generate(hybrid, 12, monkeypatch, graphs=True)
    assert again.token_ids == eager.token_ids


def test_a_planned_hybrid_chains_greedy_steps_on_the_gpu(tmp_path, monkeypatch):
    """The plan puts the token table on the GPU: the graph holds the lookup and the argmax, and
    greedy_tokens queues a step ahead; a stop mid-way leaves the cache as a step-by-step run."""
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    hybrid = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
    table = hybrid.get_input_embeddings()
    assert table.table_device.type == "cuda" and table.ids_device == table.table_device
    eager = generate(hybrid, 12, monkeypatch, graphs=False)
    chained = generate(hybrid, 12, monkeypatch, graphs=True)
    graph = hybrid._tandem_graph_decode
    assert graph.lookup_in_graph and graph.replays == 10  # no step launched past the last token
    assert graph.chained == 10  # every replay: the step before them was the capture
    assert chained.token_ids == eager.token_ids
    monkeypatch.setenv(CHAIN_ENV, "0")
    assert prefill_and_generate(hybrid, _Ids(), PROMPT, 12).token_ids == eager.token_ids
    assert graph.replays == 21 and graph.chained == 10  # the same graph, each step waited for
    monkeypatch.delenv(CHAIN_ENV)
    # Stop at the 6th token: the step queued after it is taken back out of the cache.
    cache = PromptCache()
    stop = eager.token_ids[5]
    first = eager.token_ids.index(stop)
    cut = prefill_and_generate(hybrid, _Ids(), PROMPT, 12, stop_token_ids=[stop], prompt_cache=cache)
    assert cut.token_ids == eager.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cache.kv.get_seq_length() == len(PROMPT) + first  # the stop token was never fed
    follow = PROMPT + cut.token_ids + [4, 6]
    reused = prefill_and_generate(hybrid, _Ids(), follow, 6, prompt_cache=cache)
    assert reused.n_cached == len(PROMPT) + first
    monkeypatch.setenv(GRAPH_ENV, "0")
    assert reused.token_ids == prefill_and_generate(hybrid, _Ids(), follow, 6).token_ids


def test_sampled_steps_feed_their_token_to_the_graphs_lookup(tmp_path, monkeypatch):
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    hybrid = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
    runs = {}
    for graphs in (False, True):
        monkeypatch.setenv(GRAPH_ENV, "1" if graphs else "0")
        sampling = SamplingParams(temperature=1.5, seed=3)
        runs[graphs] = prefill_and_generate(hybrid, _Ids(), PROMPT, 12, sampling=sampling).token_ids
    assert hybrid._tandem_graph_decode.lookup_in_graph and hybrid._tandem_graph_decode.replays == 10
    assert runs[True] == runs[False]


def test_the_gpu_tables_lookup_equals_the_cpu_tables(tmp_path):
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    on_gpu = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
    on_cpu = load_model(path).model
    ids = torch.tensor([[0, 5, 63, 5, 17]])
    want = on_cpu.get_input_embeddings()(ids)
    got = on_gpu.get_input_embeddings()(ids.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


@pytest.mark.parametrize("way", HANDOVERS)
def test_streamed_experts_equal_the_waiting_call(way, tmp_path, monkeypatch):
    """ExpertsCPU on GPU inputs: the stream-ordered call (either hand-over) gives the engine's result."""
    monkeypatch.setenv(HANDOVER_ENV, way)
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    hybrid = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
    experts = next(m for m in hybrid.modules() if isinstance(m, ExpertsCPU))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, experts.hidden_size, generator=gen)
    ids = torch.randint(0, experts.num_experts, (1, 2), generator=gen)
    weights = torch.rand(1, 2, generator=gen)
    waited = experts.engine_experts(hidden, ids, weights)
    for _ in range(3):  # the same pinned buffers, reused in stream order
        streamed = experts(hidden.cuda(), ids.cuda(), weights.cuda())
        torch.testing.assert_close(streamed.cpu(), waited, rtol=0, atol=0)
    if way == "mailbox":
        box = mailbox_of(experts.engine_experts.engine).server
        assert box.served >= 3 and box.failed == 0


def test_the_host_function_hand_over_gives_the_mailboxs_tokens(tmp_path, monkeypatch):
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    tokens = {}
    for way in HANDOVERS:
        monkeypatch.setenv(HANDOVER_ENV, way)
        hybrid = load_model(path, gpu_memory=experts_on_cpu_budget(path), plan_ctx=CTX).model
        tokens[way] = generate(hybrid, 12, monkeypatch, graphs=True).token_ids
        assert hybrid._tandem_graph_decode.replays == 10
    assert tokens["mailbox"] == tokens["host-function"]


def test_experts_on_the_gpu_replay_too(tmp_path, monkeypatch):
    """QuantExperts with their blocks on the GPU: the routed matvec kernels read ids there."""
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    model = load_model(path, device="cuda:0").model
    assert all(m.capturable for m in model.modules() if isinstance(m, QuantExperts))
    eager = generate(model, 10, monkeypatch, graphs=False)
    replayed = generate(model, 10, monkeypatch, graphs=True)
    assert model._tandem_graph_decode.replays == 8
    assert replayed.token_ids == eager.token_ids


def test_experts_reading_ids_on_the_host_keep_eager_decode(tmp_path, monkeypatch):
    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    rules = tmp_path / "mapped.yaml"
    rules.write_text(
        "- match: {class: transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts}\n"
        "  replace: {class: tandem.ops.experts.QuantExperts, kwargs: {blocks_on_device: false}}\n"
        + default_rules("qwen3moe").read_text(encoding="utf-8")
    )
    model = load_model(path, rules=rules, device="cuda:0").model
    out = generate(model, 6, monkeypatch, graphs=True)
    assert not hasattr(model, "_tandem_graph_decode")
    assert out.n_generated == 6
