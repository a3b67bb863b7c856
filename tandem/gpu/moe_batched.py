"""A prompt's routed experts on the GPU from GGUF blocks: experts in chunks, copied over,
dequantized, and multiplied as padded batches.

A hybrid model's experts live in CPU RAM. For a prompt of many tokens nearly every
expert of a layer has work, and the GPU computes it all in a fraction of the time it
takes to bring the blocks over the bus; past some prompt length that copy is cheaper
than the CPU's dot products (tandem.ops.experts_cpu decides). llama.cpp does the same
from 32 tokens on.

Per chunk of experts (at most CHUNK_BYTES of blocks and their dequantized copy together,
so a DeepSeek-V3 layer's 6 GB never sits on the GPU at once): copy the chunk's gate, up
and down blocks to the GPU (unless they are there), dequantize them with the Triton kernels, gather each expert's tokens into a zero-padded batch
[experts, max tokens, hidden], and run gate, up and down as batched matrix products.
Where the source blocks are page-locked (tandem.gpu.cudart.register_host_memory) the
copies are asynchronous, in pieces that each lie within one registration. One wait for the device per call reads the tokens per expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tandem.quant.quant_tensor import QuantTensor

CHUNK_BYTES = 512 << 20


def _expert_range(qt: QuantTensor, e0: int, e1: int) -> torch.Tensor:
    size = qt.shape[1] * qt.row_bytes
    return qt.data[e0 * size : e1 * size]


def _to_device(blocks: torch.Tensor, device: torch.device) -> torch.Tensor:
    if blocks.device == device:
        return blocks
    if blocks.device.type == "cpu" and device.type == "cuda":
        from tandem.gpu.cudart import copy_to_device

        return copy_to_device(blocks, device)
    return blocks.to(device)


class _Fetcher:
    """A chunk's gate, up and down blocks on the device. From CPU memory to a CUDA device
    they are copied on a side stream into one of two staging buffers, so that the next
    chunk's copy overlaps this chunk's work; a buffer is written again only once the
    chunk that used it was dequantized."""

    def __init__(self, gate, up, down, device: torch.device, staging_bytes: int):
        self.tensors = (gate, up, down)
        self.device = device
        self.pipelined = device.type == "cuda" and staging_bytes > 0
        if self.pipelined:
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            self.staging = [torch.empty(staging_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
            self.free: list[torch.cuda.Event | None] = [None, None]
            self.count = 0

    def __call__(self, e0: int, e1: int):
        if not self.pipelined:
            return [_to_device(_expert_range(qt, e0, e1), self.device) for qt in self.tensors], None
        from tandem.gpu.cudart import copy_to_device

        slot = self.count % 2
        self.count += 1
        views, offset = [], 0
        with torch.cuda.stream(self.stream):
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            for qt in self.tensors:
                src = _expert_range(qt, e0, e1)
                if src.device == self.device:
                    views.append(src)
                    continue
                dst = self.staging[slot][offset : offset + src.numel()]
                views.append(copy_to_device(src, self.device, out=dst))
                offset += src.numel()
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return views, (copied, slot)

    def ready(self, fetched) -> list[torch.Tensor]:
        views, tag = fetched
        if tag is not None:
            torch.cuda.current_stream(self.device).wait_event(tag[0])
        return views

    def release(self, fetched) -> None:
        """The chunk is dequantized: its staging buffer may be written again."""
        _, tag = fetched
        if tag is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.free[tag[1]] = done


def batched_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate: QuantTensor,
    up: QuantTensor,
    down: QuantTensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Σ_j weights[t, j] · down_e(act(gate_e x_t) · up_e x_t) with e = ids[t, j], on x's device.

    x [T, H]; ids [T, k] int64 (an id outside [0, E), transformers' dropped slot, adds
    nothing); weights [T, k]; gate and up [E, I, H] and down [E, H, I] as QuantTensors of
    Q8_0, Q4_K, Q5_K or Q6_K blocks, on x's device or elsewhere (then copied over a
    chunk at a time).
    Computed in `dtype` with float32 sums; returns float32 [T, H].
    """
    from tandem.gpu import quant_triton

    device = x.device
    n_tok, hidden = x.shape
    k = ids.shape[1]
    n_experts, inter, _ = gate.shape
    slots = ids.reshape(-1).to(device=device, dtype=torch.int64)
    slots = torch.where((slots >= 0) & (slots < n_experts), slots, n_experts)  # E: dropped
    counts = torch.bincount(slots, minlength=n_experts + 1)[:n_experts]
    tokens_of = counts.tolist()  # the one wait for the device
    most = max(tokens_of, default=0)
    out = torch.zeros(n_tok + 1, hidden, dtype=torch.float32, device=device)  # row T: the padding's
    if most == 0:
        return out[:n_tok]
    # Each expert's slots in order: slot_at[e, i] is expert e's i-th slot (-1: padding).
    order = torch.argsort(slots, stable=True)
    sorted_experts = slots[order]
    first = torch.cumsum(counts, 0) - counts
    kept = sorted_experts < n_experts
    rank = torch.arange(order.numel(), device=device) - first[sorted_experts.clamp(max=n_experts - 1)]
    slot_at = torch.full((n_experts, most), -1, dtype=torch.int64, device=device)
    slot_at[sorted_experts[kept], rank[kept]] = order[kept]
    token_at = torch.where(slot_at >= 0, slot_at // k, n_tok)
    weight_at = torch.where(
        slot_at >= 0, weights.reshape(-1).to(device, torch.float32)[slot_at.clamp(min=0)], 0.0
    )
    padded_x = torch.cat([x.to(dtype), x.new_zeros(1, hidden, dtype=dtype)])

    # An expert's blocks (when copied) and its dequantized matrices, alive together.
    dense_bytes = torch.empty((), dtype=dtype).element_size() * 3 * inter * hidden
    per_expert = sum(qt.shape[1] * qt.row_bytes for qt in (gate, up, down) if qt.data.device != device)
    chunk = max(1, chunk_bytes // (per_expert + dense_bytes))
    chunks = [
        (e0, min(n_experts, e0 + chunk))
        for e0 in range(0, n_experts, chunk)
        if any(tokens_of[e0 : e0 + chunk])
    ]
    fetch = _Fetcher(gate, up, down, device, chunk * per_expert)
    upcoming = fetch(*chunks[0])
    for c, (e0, e1) in enumerate(chunks):
        blocks = upcoming
        if c + 1 < len(chunks):
            upcoming = fetch(*chunks[c + 1])  # its copy runs while this chunk computes
        mats = []
        for qt, b, rows, cols in zip(
            (gate, up, down),
            fetch.ready(blocks),
            (inter, inter, hidden),
            (hidden, hidden, inter),
            strict=True,
        ):
            dense = quant_triton.dequantize(b, qt.ggml_type, (e1 - e0) * rows, cols, dtype)
            mats.append(dense.view(e1 - e0, rows, cols))
        fetch.release(blocks)
        w_gate, w_up, w_down = mats
        xs = padded_x[token_at[e0:e1]]  # [c, most, H]
        h = act_fn(torch.bmm(xs, w_gate.transpose(1, 2))) * torch.bmm(xs, w_up.transpose(1, 2))
        y = torch.bmm(h.to(dtype), w_down.transpose(1, 2)).float()  # [c, most, H]
        out.index_add_(0, token_at[e0:e1].reshape(-1), (y * weight_at[e0:e1, :, None]).reshape(-1, hidden))
    return out[:n_tok]
    # Each expert's slots in order: slot_at[e, i] is expert e's i-th slot (-1: padding).
    order = torch.argsort(slots, stable=True)
    sorted_experts = slots[order]
    first = torch.cumsum(counts, 0) - counts
    kept = sorted_experts < n_experts
    rank = torch.arange(order.numel(), device=device) - first[sorted_experts.clamp(max=n_experts - 1)]
    slot_at = torch.full((n_experts, most), -1, dtype=torch.int64, device=device)
    slot_at[sorted_experts[kept], rank[kept]] = order[kept]
    token_at = torch.where(slot_at >= 0, slot_at // k, n_tok)
    weight_at = torch.where(
        slot_at >= 0, weights.reshape(-1).to(device, torch.float32)[slot_at.clamp(min=0)], 0.0
    )
    padded_x = torch.cat([x.to(dtype), x.new_zeros(1, hidden, dtype=dtype)])

    # An expert's blocks (when copied) and its dequantized matrices, alive together.
    dense_bytes = torch.empty((), dtype=dtype).element_size() * 3 * inter * hidden
    per_expert = sum(qt.shape[1] * qt.row_bytes for qt in (gate, up, down) if qt.data.device != device)
    chunk = max(1, chunk_bytes // (per_expert + dense_bytes))
    for e0 in range(0, n_experts, chunk):
        e1 = min(n_experts, e0 + chunk)
        if not any(tokens_of[e0:e1]):
            continue
        mats = []
        for qt, rows, cols in ((gate, inter, hidden), (up, inter, hidden), (down, hidden, inter)):
            blocks = _to_device(_expert_range(qt, e0, e1), device)
            dense = quant_triton.dequantize(blocks, qt.ggml_type, (e1 - e0) * rows, cols, dtype)
            mats.append(dense.view(e1 - e0, rows, cols))
        w_gate, w_up, w_down = mats
        xs = padded_x[token_at[e0:e1]]  # [c, most, H]
        h = act_fn(torch.bmm(xs, w_gate.transpose(1, 2))) * torch.bmm(xs, w_up.transpose(1, 2))
        y = torch.bmm(h.to(dtype), w_down.transpose(1, 2)).float()  # [c, most, H]
        out.index_add_(0, token_at[e0:e1].reshape(-1), (y * weight_at[e0:e1, :, None]).reshape(-1, hidden))
    return out[:n_tok]
