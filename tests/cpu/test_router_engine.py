"""The engine's softmax top-k routing of a prompt (csrc/engine/router.cpp) against torch's."""

from __future__ import annotations

import pytest
import torch

from tandem.cpu.engine import CPUEngine


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("n,experts,k", [(1, 8, 2), (13, 60, 4), (300, 128, 8)])  # 300 rows: on the pool
def test_top_k_matches_torch(n, experts, k, renormalize):
    logits = torch.randn(n, experts, generator=torch.Generator().manual_seed(n + experts)) * 3
    weights, ids = CPUEngine(threads=2).softmax_top_k(logits, k, renormalize)
    probs = torch.softmax(logits, dim=-1)
    ref_w, ref_i = torch.topk(probs, k, dim=-1)
    if renormalize:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-7)


def test_ties_go_to_the_lower_id_and_nan_rows_leave_empty_slots():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, float("nan"), 1.0, 2.0, 3.0]])
    weights, ids = CPUEngine(threads=1).softmax_top_k(logits, 2, True)
    assert ids[0].tolist() == [1, 2]
    assert weights[0].tolist() == [0.5, 0.5]
    assert ids[1].tolist() == [-1, -1] and weights[1].tolist() == [0.0, 0.0]


def test_refuses_tensors_outside_its_form():
    engine = CPUEngine(threads=1)
    assert engine.softmax_top_k(torch.randn(4, 8).double(), 2, True) is None
    assert engine.softmax_top_k(torch.randn(8, 4).t(), 2, True) is None
    assert engine.softmax_top_k(torch.randn(4, 8), 9, True) is None
