"""A hybrid model's long prompts with the experts copied to the GPU follow the engine's logits."""

from __future__ import annotations

import pytest
import torch

from tandem.gpu.prefill_split import SPLIT_ENV, PrefillSplit
from tandem.inject.model import load_model
from tandem.ops.experts_cpu import PREFILL_ON_GPU_ENV, ExpertsCPU
from tandem.synth.tiny import write_tiny
from tests.gpu.test_graph_decode import CTX, experts_on_cpu_budget

pytestmark = pytest.mark.gpu

BF16_REL_ERR = 2e-2  # bf16 products on the GPU against the engine's 8-bit activations


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
@pytest.mark.parametrize("cut", ["cost", "half", "all-gpu"])
def test_prompt_experts_on_the_gpu_follow_the_engine(arch, cut, tmp_path, monkeypatch):
    """Whatever the cut between the GPU's experts and the engine's."""
    if cut == "all-gpu":
        monkeypatch.setenv(SPLIT_ENV, "0")
    if cut == "half":
        monkeypatch.setattr(PrefillSplit, "cut", lambda self, tokens_of: len(tokens_of) // 2)
    path = write_tiny(arch, tmp_path / "moe.gguf", "Q8_0")
    gib = experts_on_cpu_budget(path)
    ids = torch.randint(3, 60, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    logits = {}
    for from_tokens in (0, 16):
        monkeypatch.setenv(PREFILL_ON_GPU_ENV, str(from_tokens))
        model = load_model(path, gpu_memory=gib, plan_ctx=CTX).model
        experts = [m for m in model.modules() if isinstance(m, ExpertsCPU)]
        assert experts and all(m.prefill_on_gpu_from == from_tokens for m in experts)
        with torch.inference_mode():
            logits[from_tokens] = model(input_ids=ids).logits.float().cpu()
        if from_tokens:
            assert all(m._pinned for m in experts)  # the mapped blocks were page-locked
    ref = logits[0]
    assert ((logits[16] - ref).norm() / ref.norm()).item() < BF16_REL_ERR
