"""Routers against the Hugging Face MoE blocks' own gates: equal indices, equal weights (float32).

The tandem routers follow the same torch calls as Hugging Face's, so the bound is
bit-equality (atol 0, rtol 0), also where scores or whole groups tie exactly.
"""

from __future__ import annotations

import pytest
import torch
from fake_weights import FakeWeights
from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from tandem.errors import RuleError
from tandem.ops.routers import DeepseekV2Router, DeepseekV3Router, SoftmaxTopKRouter

H, E = 16, 16
KEY = "model.layers.1.mlp.gate"
COMMON = dict(hidden_size=H, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)


def qwen2(norm):
    cfg = Qwen2MoeConfig(
        **COMMON,
        num_experts=E,
        num_experts_per_tok=4,
        norm_topk_prob=norm,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
    )
    return Qwen2MoeSparseMoeBlock(cfg), SoftmaxTopKRouter, {}


def qwen3(norm):
    cfg = Qwen3MoeConfig(
        **COMMON, num_experts=E, num_experts_per_tok=4, norm_topk_prob=norm, moe_intermediate_size=8
    )
    return Qwen3MoeSparseMoeBlock(cfg), SoftmaxTopKRouter, {}


def mixtral(_):
    cfg = MixtralConfig(**COMMON, num_local_experts=E, num_experts_per_tok=2)
    return MixtralSparseMoeBlock(cfg), SoftmaxTopKRouter, {}


def deepseek_v2(method):
    cfg = DeepseekV2Config(
        **COMMON,
        n_routed_experts=E,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        topk_method=method,
        routed_scaling_factor=1.5,
        moe_intermediate_size=8,
        n_shared_experts=1,
    )
    return DeepseekV2Moe(cfg), DeepseekV2Router, {}


def deepseek_v3(norm):
    cfg = DeepseekV3Config(
        **COMMON,
        n_routed_experts=E,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        norm_topk_prob=norm,
        routed_scaling_factor=2.5,
        moe_intermediate_size=8,
        n_shared_experts=1,
    )
    return DeepseekV3MoE(cfg), DeepseekV3Router, {}


CASES = [
    (qwen2, True),
    (qwen2, False),
    (qwen3, True),
    (qwen3, False),
    (mixtral, None),
    (deepseek_v2, "greedy"),
    (deepseek_v2, "group_limited_greedy"),
    (deepseek_v3, True),
    (deepseek_v3, False),
]
IDS = [f"{f.__name__}-{a}" for f, a in CASES]


def build(make, arg, weight=None, bias=None):
    torch.manual_seed(0)
    block, cls, kwargs = make(arg)
    block = block.float().eval()
    with torch.no_grad():
        gate = block.gate
        gate.weight.copy_(torch.randn_like(gate.weight) if weight is None else weight)
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.copy_(torch.randn(E) * 0.1 if bias is None else bias)
        for name, p in block.named_parameters():
            if not name.startswith("gate."):
                p.normal_(0, 0.1)
    op = cls(KEY, gate, block.config if hasattr(block, "config") else None, **kwargs)
    op.load(FakeWeights.of(gate, KEY))
    return block, op


def check(block, op, x):
    with torch.no_grad():
        ref = block.gate(x)
        got = op(x)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)  # logits
    torch.testing.assert_close(got[2], ref[2], rtol=0, atol=0)  # indices
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)  # weights
    assert got[1].dtype == ref[1].dtype
    return ref


@pytest.mark.parametrize(("make", "arg"), CASES, ids=IDS)
def test_random(make, arg):
    block, op = build(make, arg)
    x = torch.randn(2, 7, H)
    check(block, op, x)
    # The whole block with its gate swapped gives the same output.
    with torch.no_grad():
        ref = block(x)
        block.gate = op
        torch.testing.assert_close(block(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize(("make", "arg"), CASES, ids=IDS)
def test_ties(make, arg):
    # Integer inputs and weights make the logits exact; the weight repeats every 4 experts,
    # so every group holds the same scores and experts tie within and across groups.
    torch.manual_seed(1)
    weight = torch.randint(-2, 3, (4, H)).float().repeat(E // 4, 1)
    weight[1] = weight[2]
    bias = torch.zeros(E)
    block, op = build(make, arg, weight=weight, bias=bias)
    x = torch.randint(-1, 2, (9, H)).float()
    x[0] = 0  # all logits zero: every expert ties
    ref = check(block, op, x)
    assert (ref[0][0] == 0).all()


def test_bad_kwargs():
    block, _, _ = deepseek_v2("greedy")
    with pytest.raises(RuleError, match="topk_method"):
        DeepseekV2Router(KEY, block.gate, block.config, topk_method="noaux_tc")
    with pytest.raises(RuleError, match="e_score_correction_bias"):
        DeepseekV3Router(KEY, block.gate, block.config)
    with pytest.raises(RuleError, match="2-D weight"):
        SoftmaxTopKRouter(KEY, torch.nn.LayerNorm(4), None)
