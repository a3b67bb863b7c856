"""The routed-experts computation in float64, with the engine's 8-bit activation steps.

`experts_exact` quantizes the activations exactly where the engine does (x for
gate and up, h = silu(gate) * up for down) with the rule of
tandem.cpu.reference, so the engine may differ from it only by float32
rounding; the plain float32 torch operator (tandem.ops.experts) is the
other, looser reference.
"""

from __future__ import annotations

import torch

from tandem.cpu import kernels, reference
from tandem.quant.quant_tensor import QuantTensor


def experts_exact(variant, gate: QuantTensor, up: QuantTensor, down: QuantTensor, x, ids, weights):
    """x [T, H], ids [T, k], weights [T, k] -> float64 [T, H]."""
    n_experts = gate.shape[0]
    fmt = {
        name: kernels.act_format(variant, qt.ggml_type) for name, qt in (("g", gate), ("u", up), ("d", down))
    }
    wg, wu, wd = (
        qt.dequantize(torch.float32).double() for qt in (gate, up, down)
    )  # [E, I, H], [E, I, H], [E, H, I]
    xg = reference.prepared_activations(x, fmt["g"])  # [T, H]
    xu = reference.prepared_activations(x, fmt["u"])
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for e in range(n_experts):
        token, slot = (ids == e).nonzero(as_tuple=True)  # [n], [n]
        if token.numel() == 0:
            continue
        g = xg[token] @ wg[e].T  # [n, I]
        u = xu[token] @ wu[e].T
        # The engine computes h in float32 before quantizing it.
        h = torch.nn.functional.silu(g.float()) * u.float()
        y = reference.prepared_activations(h, fmt["d"]) @ wd[e].T  # [n, H]
        out.index_add_(0, token, weights[token, slot].double()[:, None] * y)
    return out
