"""The placement plan: never over its budget, whole layers' experts from the last, rules that place them."""

from __future__ import annotations

import json

import pytest
import torch

from tandem.inject.injector import inject
from tandem.inject.loader import build_meta_model, default_rules
from tandem.inject.plan import GIB, PlanError, allocated, kv_bytes_per_token, plan_placement
from tandem.inject.rules import load_rules, parse_rules
from tandem.synth.tiny import write_tiny
from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile
from tests.test_cli import assert_user_error, tandem


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    path = write_tiny("qwen3moe", tmp_path_factory.mktemp("plan") / "moe.gguf", "Q8_0")
    gguf = GGUFFile.open(path)
    rules_path = default_rules(gguf.architecture, gguf.tensors)
    yield path, gguf, config_of(gguf), load_rules(rules_path), rules_path.read_text(encoding="utf-8")
    gguf.close()


def plan(tiny_moe, budget, ctx=64, reserve=0):
    _, gguf, config, rules, _ = tiny_moe
    return plan_placement(gguf, config, rules, budget, ctx, reserve=reserve)


def test_no_budget_keeps_everything_on_the_cpu(tiny_moe):
    p = plan(tiny_moe, 0)
    assert p.device == "cpu" and p.gpu_bytes == 0 and p.gpu_expert_layers == ()
    assert p.cpu_expert_layers == tuple(range(tiny_moe[2].num_hidden_layers))
    assert p.placement_yaml() == ""


def test_a_model_that_fits_goes_whole_to_the_gpu(tiny_moe):
    p = plan(tiny_moe, 64 * GIB, reserve=GIB)
    assert p.dense_mode == "load" and p.cpu_expert_layers == ()
    assert p.gpu_bytes <= p.budget
    assert p.kv_bytes == 64 * kv_bytes_per_token(tiny_moe[2])


def test_every_budget_is_kept_and_filled_with_the_last_layers_first(tiny_moe):
    full = plan(tiny_moe, 64 * GIB)
    floor = full.dense_bytes + full.kv_bytes
    per_layer = full.layer_expert_bytes
    layers = sorted(per_layer)
    previous = -1
    for budget in range(floor, floor + sum(per_layer.values()) + 2, max(1, sum(per_layer.values()) // 97)):
        p = plan(tiny_moe, budget)
        assert p.gpu_bytes <= budget
        n = len(p.gpu_expert_layers)
        assert p.gpu_expert_layers == tuple(layers[len(layers) - n :])  # a suffix: the last layers
        assert n >= previous  # more memory never moves experts back to the CPU
        previous = n
        if n < len(layers):  # the next layer would not have fitted
            assert p.gpu_bytes + per_layer[layers[len(layers) - n - 1]] > budget


def test_one_layer_exactly(tiny_moe):
    full = plan(tiny_moe, 64 * GIB)
    last = max(full.layer_expert_bytes)
    budget = full.dense_bytes + full.kv_bytes + full.layer_expert_bytes[last]
    assert plan(tiny_moe, budget).gpu_expert_layers == (last,)
    assert plan(tiny_moe, budget - 1).gpu_expert_layers == ()


def test_weights_stay_blocks_when_their_dequantized_copy_does_not_fit(tiny_moe):
    full = plan(tiny_moe, 64 * GIB)
    assert full.dense_mode == "load"
    tight = full.dense_bytes - full.table_bytes + full.kv_bytes - 1  # the bf16 copy no longer fits
    p = plan(tiny_moe, tight)
    assert p.dense_mode == "none" and p.dense_bytes < full.dense_bytes and p.gpu_bytes <= tight


def test_the_token_table_goes_to_the_gpu_when_it_fits_beside_the_dense_weights(tiny_moe):
    full = plan(tiny_moe, 64 * GIB)
    table = tiny_moe[1].tensors["token_embd.weight"]
    assert full.table_on_gpu and full.table_bytes == allocated(table.n_bytes)
    fits = full.dense_bytes + full.kv_bytes  # the dequantized dense weights and the table, no experts
    p = plan(tiny_moe, fits)
    assert p.table_on_gpu and p.dense_mode == "load" and p.gpu_expert_layers == ()
    p = plan(tiny_moe, fits - 1)  # the table no longer fits beside them: back to CPU RAM
    assert not p.table_on_gpu and p.dense_mode == "load" and p.gpu_bytes <= fits - 1
    assert "table_device" not in p.placement_yaml()


def test_too_small_a_budget_says_what_does_not_fit(tiny_moe):
    with pytest.raises(PlanError, match="cannot hold the attention and dense weights"):
        plan(tiny_moe, 1000)
    with pytest.raises(PlanError, match="at least 1 token"):
        plan(tiny_moe, GIB, ctx=0)


def test_the_rules_place_each_part_where_the_plan_says(tiny_moe):
    _, _, config, _, default_text = tiny_moe
    full = plan(tiny_moe, 64 * GIB)
    last = max(full.layer_expert_bytes)
    p = plan(tiny_moe, full.dense_bytes + full.kv_bytes + full.layer_expert_bytes[last])
    rules = parse_rules(p.rules_yaml(default_text), "plan.yaml")
    model = build_meta_model(config)
    placements, _ = inject(model, rules, config, p.device)
    by_path = {pl.path: pl for pl in placements}
    for layer in range(config.num_hidden_layers):
        experts = by_path[f"model.layers.{layer}.mlp.experts"]
        if layer == last:
            assert (experts.operator, experts.device) == ("tandem.ops.experts.QuantExperts", "cuda:0")
        else:
            assert (experts.operator, experts.device) == ("tandem.ops.experts_cpu.ExpertsCPU", "cpu")
        q = by_path[f"model.layers.{layer}.self_attn.q_proj"]
        assert (q.operator, q.device) == ("tandem.ops.linear_gpu.QuantLinearGPU", "cuda:0")
    assert by_path["lm_head"].device == "cuda:0"
    embed = by_path["model.embed_tokens"]
    assert (
        embed.operator == "tandem.ops.embedding.QuantEmbedding"
    )  # dequant: call, the table's blocks on the GPU
    assert model.model.embed_tokens.dequant == "call"
    assert torch.device(embed.device).type == "cuda"
    assert p.table_on_gpu and model.model.embed_tokens.table_device == torch.device("cuda:0")


@pytest.mark.parametrize(
    "arch,variant", [("qwen2moe", "v3"), ("mixtral", "v3"), ("deepseek2", "v2"), ("deepseek2", "v3")]
)
def test_every_moe_familys_experts_go_where_the_plan_says(arch, variant, tmp_path):
    path = write_tiny(arch, tmp_path / "moe.gguf", "Q8_0", variant=variant)
    with GGUFFile.open(path) as gguf:
        config = config_of(gguf)
        rules_path = default_rules(gguf.architecture, gguf.tensors)
        rules = load_rules(rules_path)
        full = plan_placement(gguf, config, rules, 64 * GIB, 64, reserve=0)
        last = max(full.layer_expert_bytes)
        budget = full.dense_bytes + full.kv_bytes + full.layer_expert_bytes[last]
        p = plan_placement(gguf, config, rules, budget, 64, reserve=0)
    assert p.gpu_expert_layers == (last,)
    model = build_meta_model(config)
    placements, _ = inject(
        model, parse_rules(p.rules_yaml(rules_path.read_text()), "plan.yaml"), config, p.device
    )
    by_path = {pl.path: pl for pl in placements}
    for layer in full.layer_expert_bytes:  # DeepSeek's first layers are dense
        experts = by_path[f"model.layers.{layer}.mlp.experts"]
        want = ("QuantExperts", "cuda:0") if layer == last else ("ExpertsCPU", "cpu")
        assert (experts.operator.rsplit(".", 1)[1], experts.device) == want, (layer, type(config).__name__)


def test_inspect_prints_the_plan(tiny_moe):
    path = str(tiny_moe[0])
    proc = tandem("inspect", path, "--plan", "--gpu-memory", "64", "--ctx", "128", "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)["plan"]
    assert p["device"] == "cuda:0" and p["ctx"] == 128 and p["cpu_expert_layers"] == []
    assert p["gpu_bytes"] <= p["budget_bytes"] == 64 * GIB
    assert p["table_bytes"] > 0 and "table_device" in p["rules"]
    assert parse_rules(p["rules"])
    shown = tandem("inspect", path, "--plan", "--gpu-memory", "64", "--ctx", "128")
    assert shown.returncode == 0 and "token table" in shown.stdout
    text = tandem("inspect", path, "--plan", "--gpu-memory", "0")
    assert text.returncode == 0 and "everything runs on the CPU" in text.stdout
    assert_user_error(tandem("inspect", path, "--plan", "--gpu-memory", "0.001"), "cannot hold")
    assert_user_error(tandem("inspect", path, "--plan", "--ctx", "0"), "--ctx must be at least 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_gpu_memory_without_a_gpu_runs_everything_on_the_cpu(tiny_moe):
    path = str(tiny_moe[0])
    args = ("--model", path, "--prompt", "hi", "-n", "3", "--temperature", "0")
    planned = tandem("generate", *args, "--gpu-memory", "24")
    assert planned.returncode == 0, planned.stderr
    assert "no CUDA device here" in planned.stderr
    assert planned.stdout == tandem("generate", *args).stdout  # the same CPU run
    rules = str(default_rules("qwen3moe"))
    assert_user_error(tandem("generate", *args, "--gpu-memory", "24", "--rules", rules), "give one of them")
    assert_user_error(tandem("generate", *args, "--gpu-memory", "-1"), "at least 0")
