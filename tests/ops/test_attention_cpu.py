"""tandem's grouped SDPA attention equals Hugging Face's "sdpa" (which repeats the KV heads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tandem.ops.attention_cpu import grouped_sdpa_attention


class FakeAttention(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("tq,tk,masked", [(1, 9, False), (1, 9, True), (6, 6, False), (6, 11, True)])
@pytest.mark.parametrize("groups", [1, 4])
def test_equals_hugging_face_sdpa(tq, tk, masked, groups):
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(2, 2 * groups, tq, 16, generator=g)
    k = torch.randn(2, 2, tk, 16, generator=g)
    v = torch.randn(2, 2, tk, 16, generator=g)
    mask = None
    if masked:  # causal over the last tq positions, plus a padded first key in batch row 1
        mask = torch.ones(2, 1, tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
        mask[1, :, :, 0] = False
    module = FakeAttention(groups).eval()
    ours, _ = grouped_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (2, tq, 2 * groups, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
