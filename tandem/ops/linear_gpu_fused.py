"""Projections of one input on the GPU computed as one product.

An attention module calls q_proj, k_proj and v_proj on the same hidden states, and an
MLP calls gate_proj and up_proj on the same input. On a GPU each call is a cast of the
input to bf16, a matrix product and a cast back: at a decode step, three small products
where one would do. `fuse_shared_inputs` stacks such siblings' bf16 weights (the
`QuantLinearGPU` modules with `dequant: load` and one dense weight each) into one
matrix held by a `SharedInput`: the first sibling called on an input computes all the
outputs, and the others take their columns of it when called on the same tensor. A
sibling called on another input, or twice, computes again, so the result never
depends on the order of the calls. The weights are moved, not copied: the GPU memory
stays what the plan counted.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.ops.linear_gpu import QuantLinearGPU

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """The stacked weight of sibling projections and the outputs of their last input."""

    def __init__(self, ops: list[QuantLinearGPU]):
        weights = [op.parts[0].dense for op in ops]
        self.weight = torch.cat(weights)
        biases = [op.bias for op in ops]
        self.bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
        self.bounds = [0]
        for op in ops:
            self.bounds.append(self.bounds[-1] + op.out_features)
        self.in_features = ops[0].in_features
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.taken: set[int] = set()

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Sibling `index`'s output for x [..., in] -> [..., out_index] float32."""
        if self.input is not x or index in self.taken:
            flat = x.reshape(-1, self.in_features).to(self.weight.device)
            y = nn.functional.linear(flat.to(self.weight.dtype), self.weight).float()
            if self.bias is not None:
                y = y + self.bias
            self.input, self.output, self.taken = x, y, set()
        self.taken.add(index)
        out = self.output[:, self.bounds[index] : self.bounds[index + 1]]
        if len(self.taken) == len(self.bounds) - 1:  # every sibling has its part: let go of them
            self.input = self.output = None
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _fusable(ops) -> bool:
    if not all(isinstance(op, QuantLinearGPU) for op in ops):
        return False
    first = ops[0]
    return all(
        len(op.parts) == 1
        and op.parts[0].dense is not None
        and op.parts[0].dense.dtype == first.parts[0].dense.dtype
        and op.parts[0].dense.device == first.parts[0].dense.device
        and op.in_features == first.in_features
        and (op.bias is None) == (first.bias is None)
        and op.shared is None
        for op in ops
    )


def fuse_shared_inputs(model: nn.Module) -> int:
    """Give every group of sibling projections one SharedInput; how many groups got one."""
    groups = 0
    for module in model.modules():
        for names in SIBLINGS:
            ops = [getattr(module, name, None) for name in names]
            if not _fusable(ops):
                continue
            shared = SharedInput(ops)
            for index, op in enumerate(ops):
                op.shared, op.shared_index = shared, index
                op.parts[0].dense = None  # now a block of the stacked weight
            groups += 1
    return groups
