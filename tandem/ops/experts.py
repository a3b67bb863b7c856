"""Routed experts kept as GGUF blocks; each call computes only the experts that received tokens.

Replaces a transformers 5.x experts module (`Qwen2MoeExperts`, `Qwen3MoeExperts`,
`MixtralExperts`, ...): fused weights `gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I], called as `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
-> [T, H]`. The router and any shared expert stay outside, so a rule swaps this alone.

This is the torch reference of the unit the CPU engine takes over: the weights are
three QuantTensors (views of the mapped file), never dequantized whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from tandem.errors import RuleError
from tandem.ops.base import TandemModule
from tandem.ops.linear import parse_dtype
from tandem.quant.quant_tensor import QuantTensor
from tandem.weights.source import GGUFWeights

OPS = (None, "torch")
# Tokens per call up to which experts with their blocks on the device take the routed
# matvec kernels (decode), above which each routed expert is dequantized for the call.
ROUTED_MAX_TOKENS = 8


class QuantExperts(TandemModule):
    """out[t] = Σ_j w[t, j] · down_e(act(gate_e(x[t])) · up_e(x[t])), e = top_k_index[t, j].

    dtype: the compute dtype of the dequantized expert weights and the activations.
    blocks_on_device: copy the GGUF blocks to generate_device at load and compute there
    with the Triton kernels (Q8_0, Q4_K, Q5_K, Q6_K; other types stay in the mapped file):
    calls of up to ROUTED_MAX_TOKENS tokens as one routed matvec per projection over all
    slots, reading the ids on the device (so a CUDA graph can hold them), longer ones as
    padded batches over chunks of dequantized experts (tandem.gpu.moe_batched). Default: on a CUDA device, so experts a placement
    puts on the GPU live in its memory.
    """

    OPS = OPS  # the generate_op / prefill_op names this class accepts

    def __init__(
        self,
        key: str,
        orig: nn.Module,
        config: PretrainedConfig,
        *,
        dtype: str = "float32",
        blocks_on_device: bool | None = None,
        **base,
    ):
        super().__init__(key, orig, config, **base)
        if blocks_on_device is None:
            blocks_on_device = self.generate_device.type == "cuda"
        self.blocks_on_device = bool(blocks_on_device)
        self.on_device: set[str] = set()  # the tensors whose blocks were copied to the device
        gate_up = getattr(orig, "gate_up_proj", None)
        down = getattr(orig, "down_proj", None)
        if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
            raise RuleError(
                f"{key}: QuantExperts replaces experts modules with fused gate_up_proj and down_proj "
                f"tensors, not {type(orig).__name__}"
            )
        if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2:
            raise RuleError(f"{key}: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I]")
        self.num_experts, two_i, self.hidden_size = gate_up.shape
        self.intermediate_size = two_i // 2
        if tuple(down.shape) != (self.num_experts, self.hidden_size, self.intermediate_size):
            raise RuleError(
                f"{key}: down_proj {list(down.shape)} does not match gate_up_proj {list(gate_up.shape)}"
            )
        # transformers' experts decorator records the layout; only the plain one exists in GGUF.
        if getattr(orig, "has_bias", False) or getattr(orig, "is_transposed", False):
            raise RuleError(f"{key}: experts with biases or transposed weights are not supported")
        if not getattr(orig, "is_concatenated", True) or not getattr(orig, "has_gate", True):
            raise RuleError(f"{key}: only experts with a gate concatenated before up are supported")
        if self.generate_op not in self.OPS or self.prefill_op not in self.OPS:
            ops = ", ".join(repr(op) for op in self.OPS if op)
            raise RuleError(f"{key}: {type(self).__name__}'s ops are {ops}")
        act = getattr(orig, "act_fn", None)
        self.act_fn = act if isinstance(act, nn.Module) else ACT2FN[config.hidden_act]
        self.dtype = parse_dtype(dtype, key)
        self.gate = self.up = self.down = None  # QuantTensor [E, I, H], [E, I, H], [E, H, I]

    def load(self, weights: GGUFWeights) -> None:
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        self.gate, self.up = weights.quant_parts(f"{self.key}.gate_up_proj", (e, 2 * i, h))
        self.down = weights.quant(f"{self.key}.down_proj", (e, h, i))
        if self.blocks_on_device:
            from tandem.ops.linear_gpu import triton_kernels

            quant_triton = triton_kernels()
            for name in ("gate", "up", "down"):
                qt = getattr(self, name)
                if quant_triton.supports(qt.ggml_type, qt.shape[-1]):
                    moved = QuantTensor(qt.data.to(self.generate_device), qt.ggml_type, qt.shape, qt.name)
                    setattr(self, name, moved)
                    self.on_device.add(name)

    @property
    def routed_on_device(self) -> bool:
        """Whether calls of up to ROUTED_MAX_TOKENS tokens take the routed matvec kernels."""
        return self.on_device == {"gate", "up", "down"}

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can hold a decode call: only the routed kernels read no ids on the host."""
        return self.routed_on_device

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # [T, H], [T, k], [T, k] -> [T, H]
        if self.routed_on_device and hidden_states.shape[0] <= ROUTED_MAX_TOKENS:
            return self._routed(hidden_states, top_k_index, top_k_weights)
        if self.routed_on_device:
            return self._batched(hidden_states, top_k_index, top_k_weights)
        device = self.generate_device
        x = hidden_states.to(device=device, dtype=self.dtype)  # [T, H]
        out = torch.zeros_like(x)
        k = top_k_index.shape[-1]
        ids = top_k_index.reshape(-1).cpu()  # [T*k], slot s belongs to token s // k
        weights = top_k_weights.reshape(-1).to(device=device, dtype=self.dtype)  # [T*k]
        # transformers 5.24 marks dropped slots with id E; anything else outside [0, E) is a bug.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.num_experts):
            raise IndexError(f"{self.key}: expert id outside [0, {self.num_experts})")
        order = torch.argsort(ids, stable=True)  # slots grouped by expert, ascending as transformers does
        hit, counts = torch.unique_consecutive(ids[order], return_counts=True)
        start = 0
        for expert, count in zip(hit.tolist(), counts.tolist(), strict=True):
            slots = order[start : start + count].to(device)  # [n]
            start += count
            if expert == self.num_experts:
                continue
            token = torch.div(slots, k, rounding_mode="floor")  # [n]
            xs = x[token]  # [n, H]
            gate = F.linear(xs, self._weight("gate", expert))  # [n, I]
            up = F.linear(xs, self._weight("up", expert))  # [n, I]
            ys = F.linear(self.act_fn(gate) * up, self._weight("down", expert))  # [n, H]
            out.index_add_(0, token, ys * weights[slots, None])
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def _routed(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """A few tokens on the device's blocks: each routed slot's gate, up and down as one
        matvec kernel each over all slots, the ids read on the device (a dropped slot's
        id E gives zeros; ids are not checked, which would need the host)."""
        from tandem.ops.linear_gpu import triton_kernels

        quant_triton = triton_kernels()
        device = self.generate_device
        n, k = hidden.shape[0], top_k_index.shape[-1]
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        x = hidden.to(device=device, dtype=torch.float32).reshape(n, h)
        ids = top_k_index.reshape(-1).to(device=device, dtype=torch.int64)  # [n*k]
        gate = quant_triton.routed_matvec(self.gate.data, self.gate.ggml_type, e, i, ids, x, k)
        up = quant_triton.routed_matvec(self.up.data, self.up.ggml_type, e, i, ids, x, k)
        act = (self.act_fn(gate.to(self.dtype)) * up.to(self.dtype)).float()  # [n*k, I]
        y = quant_triton.routed_matvec(self.down.data, self.down.ggml_type, e, h, ids, act, 1)
        w = top_k_weights.reshape(n, k, 1).to(device=device, dtype=torch.float32)
        out = (y.view(n, k, h) * w).sum(dim=1)
        return out.to(device=hidden.device, dtype=hidden.dtype)

    def _batched(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Many tokens on the device's blocks: experts dequantized a chunk at a time and
        multiplied as padded batches (tandem.gpu.moe_batched), not one expert at a time."""
        from tandem.gpu.moe_batched import batched_experts

        device = self.generate_device
        n, k = hidden.shape[0], top_k_index.shape[-1]
        # An id outside [0, E] is a bug upstream (E marks a dropped slot): say so, as the
        # per-expert path does; a prompt can afford the wait for the device.
        if top_k_index.numel() and (int(top_k_index.min()) < 0 or int(top_k_index.max()) > self.num_experts):
            raise IndexError(f"{self.key}: expert id outside [0, {self.num_experts})")
        dtype = self.dtype if self.dtype in (torch.float32, torch.bfloat16) else torch.float32
        x = hidden.to(device=device).reshape(n, self.hidden_size)
        out = batched_experts(
            x, top_k_index.reshape(n, k), top_k_weights.reshape(n, k), self.gate, self.up, self.down,
            self.act_fn, dtype=dtype,
        )  # fmt: skip
        return out.to(device=hidden.device, dtype=hidden.dtype)

    def _weight(self, name: str, expert: int) -> torch.Tensor:
        qt = getattr(self, name).expert(expert)
        if name in self.on_device:
            from tandem.ops.linear_gpu import triton_kernels

            quant_triton = triton_kernels()
            rows, cols = qt.shape
            dtype = self.dtype if self.dtype in (torch.float32, torch.bfloat16) else torch.float32
            return quant_triton.dequantize(qt.data, qt.ggml_type, rows, cols, dtype).to(self.dtype)
        return qt.dequantize(self.dtype).to(self.generate_device)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, experts={self.num_experts}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}"
        )
