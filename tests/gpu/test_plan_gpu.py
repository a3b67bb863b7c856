"""A planned placement on a CUDA GPU: it allocates no more than its plan and follows the CPU's logits."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from tandem.cpu.engine import torch_reference
from tandem.inject.loader import default_rules
from tandem.inject.model import load_model
from tandem.inject.plan import GIB, RESERVE_FIXED, RESERVE_FRACTION, plan_placement
from tandem.inject.rules import load_rules
from tandem.synth.tiny import write_tiny
from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile

pytestmark = pytest.mark.gpu

CTX = 64
BF16_REL_ERR = (
    2e-2  # the GPU's linear layers in bf16 (and the engine's 8-bit activations for the CPU experts)
)


def budget_for_the_last_layer(path) -> tuple[float, object]:
    """A budget (GiB) whose plan puts exactly the last layer's experts on the GPU, and that plan."""
    with GGUFFile.open(path) as gguf:
        config = config_of(gguf)
        rules = load_rules(default_rules(gguf.architecture, gguf.tensors))
        full = plan_placement(gguf, config, rules, 64 * GIB, CTX, reserve=0)
        last = max(full.layer_expert_bytes)
        needed = full.dense_bytes + full.kv_bytes + full.layer_expert_bytes[last]
        budget = math.ceil((needed + RESERVE_FIXED) / (1 - RESERVE_FRACTION)) + 1
        plan = plan_placement(gguf, config, rules, budget, CTX)
    assert plan.gpu_expert_layers == (last,), plan
    return budget / GIB, plan


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "mixtral", "deepseek2"])
def test_a_planned_model_allocates_within_its_plan_and_follows_the_cpu(arch, tmp_path):
    path = write_tiny(arch, tmp_path / "moe.gguf", "Q8_0")
    gib, plan = budget_for_the_last_layer(path)
    gc.collect()  # an earlier test's tensors freed during the load would hide this load's own
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    hybrid = load_model(path, gpu_memory=gib, plan_ctx=CTX)
    weights = torch.cuda.memory_allocated() - before
    assert 0 < weights <= plan.gpu_bytes - plan.reserve - plan.kv_bytes  # the cache is not made at load
    where = {p.path: (p.operator, p.device) for p in hybrid.placements}
    last = plan.gpu_expert_layers[0]
    for layer in plan.layer_expert_bytes:  # DeepSeek's first layers are dense
        want = (
            ("tandem.ops.experts.QuantExperts", "cuda:0")
            if layer == last
            else ("tandem.ops.experts_cpu.ExpertsCPU", "cpu")
        )
        assert where[f"model.layers.{layer}.mlp.experts"] == want
    with torch_reference():  # float32 torch operators on the CPU: the reference
        cpu = load_model(path)
    vocab = min(200, hybrid.config.vocab_size)
    ids = torch.randint(3, vocab, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = hybrid.model(input_ids=ids.cuda()).logits.float().cpu()
        ref = cpu.model(input_ids=ids).logits
    assert ((ours - ref).norm() / ref.norm()).item() < BF16_REL_ERR
