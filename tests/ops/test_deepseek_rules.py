"""The routers and MLA through the rule engine: a whole tiny DeepSeek model, swapped by YAML."""

from __future__ import annotations

import copy

import pytest
import torch
from deepseek_tiny import rel, tiny_model
from fake_weights import FakeWeights

from tandem.errors import RuleError
from tandem.inject.injector import inject
from tandem.inject.rules import parse_rules
from tandem.ops.base import TandemModule
from tandem.ops.mla import MLAttention

RULES = """
- match: {{name: "^model\\\\.layers\\\\.\\\\d+\\\\.self_attn$"}}
  replace:
    class: tandem.ops.mla.MLAttention
    kwargs: {{prefill_op: plain, generate_op: absorbed}}
- match: {{name: "^model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.gate$"}}
  replace: {{class: {router}}}
"""
ROUTERS = {"v2": "tandem.ops.routers.DeepseekV2Router", "v3": "tandem.ops.routers.DeepseekV3Router"}


@pytest.mark.parametrize(("family", "topk_method"), [("v2", "group_limited_greedy"), ("v3", "greedy")])
def test_rules_swap_attention_and_router(family, topk_method):
    ref = tiny_model(family, 12, True, topk_method=topk_method)
    weights = FakeWeights({name: t for name, t in ref.state_dict().items()})
    model = copy.deepcopy(ref)
    placements, _ = inject(model, parse_rules(RULES.format(router=ROUTERS[family])), model.config)
    ops = [m for m in model.modules() if isinstance(m, TandemModule)]
    assert len(placements) == len(ops) == 3  # two attentions, one MoE gate
    for op in ops:
        op.load(weights)
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(11))
    pad_mask = torch.ones_like(prompt)
    pad_mask[0, :2] = 0  # a left-padded row: the bool mask from the model reaches the op
    args = dict(
        attention_mask=pad_mask,
        pad_token_id=0,
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        want = ref.generate(prompt, **args)
        got = model.generate(prompt, **args)
    assert torch.equal(got.sequences, want.sequences)
    assert rel(torch.stack(got.logits), torch.stack(want.logits)) < 1e-4


def test_rule_kwargs_checked():
    with pytest.raises(RuleError, match="takes no argument"):
        parse_rules(
            '- {match: {name: "x"}, replace: {class: tandem.ops.mla.MLAttention, kwargs: {absorb: true}}}'
        )
    with pytest.raises(RuleError, match="takes no argument"):
        parse_rules(
            '- {match: {name: "x"}, replace: {class: tandem.ops.routers.SoftmaxTopKRouter, kwargs: {k: 2}}}'
        )
    model = tiny_model("v3", None, False)
    with pytest.raises(RuleError, match="prefill_op"):
        MLAttention("a", model.model.layers[0].self_attn, model.config, prefill_op="flash")
