"""Routers and MLA on a CUDA GPU inside a CPU model (the hybrid placement): same tokens as the CPU model."""

from __future__ import annotations

import copy

import pytest
import torch
from deepseek_tiny import rel, tiny_model
from fake_weights import FakeWeights

from tandem.inject.injector import inject
from tandem.inject.rules import parse_rules
from tandem.ops.base import TandemModule

pytestmark = pytest.mark.gpu

GPU_REL_ERR = 1e-4  # float32 on both; cuBLAS sums in another order (TF32 stays off)
RULES = """
- match: {{name: "self_attn$"}}
  replace: {{class: tandem.ops.mla.MLAttention, kwargs: {{generate_device: "cuda:0", generate_op: {form}, dtype: float32}}}}
- match: {{name: "mlp\\\\.gate$"}}
  replace: {{class: {router}, kwargs: {{generate_device: "cuda:0"}}}}
"""
ROUTERS = {"v2": "tandem.ops.routers.DeepseekV2Router", "v3": "tandem.ops.routers.DeepseekV3Router"}


@pytest.mark.parametrize("form", ["plain", "absorbed"])
@pytest.mark.parametrize("family", ["v2", "v3"])
def test_ops_on_gpu_match_cpu_model(family, form):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = tiny_model(family, 12, True, topk_method="group_limited_greedy")
    weights = FakeWeights(dict(ref.state_dict()))
    model = copy.deepcopy(ref)
    inject(model, parse_rules(RULES.format(form=form, router=ROUTERS[family])), model.config)
    for op in model.modules():
        if isinstance(op, TandemModule):
            op.load(weights)
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(11))
    args = dict(
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
    assert rel(torch.stack(got.logits), torch.stack(want.logits)) < GPU_REL_ERR
