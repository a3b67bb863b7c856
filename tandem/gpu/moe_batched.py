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


def _chunk_experts(gate: QuantTensor, up: QuantTensor, down: QuantTensor, device, dtype, chunk_bytes: int):
    """(experts per chunk, bytes one expert's blocks take when copied)."""
    _, inter, hidden = gate.shape
    dense_bytes = torch.empty((), dtype=dtype).element_size() * 3 * inter * hidden
    per_expert = sum(qt.shape[1] * qt.row_bytes for qt in (gate, up, down) if qt.data.device != device)
    return max(1, chunk_bytes // (per_expert + dense_bytes)), per_expert


class _Stager:
    """Chunks of gate, up and down blocks brought to one CUDA device: copied on a side
    stream into one of two staging buffers, so that the next chunk's copy overlaps this
    chunk's work; a buffer is written again only once the chunk that used it was
    dequantized. One per device, kept: a call may also start the next call's first copy
    (the next layer's first chunk) while its own last chunk computes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.staging: list[torch.Tensor | None] = [None, None]
        self.free: list[torch.cuda.Event | None] = [None, None]
        self.count = 0
        self.ahead: tuple | None = None  # (which tensors, e0, e1, fetched) copied for the next call

    def fetch(self, tensors, e0: int, e1: int):
        from tandem.gpu.cudart import copy_to_device

        slot = self.count % 2
        self.count += 1
        sources = [_expert_range(qt, e0, e1) for qt in tensors]
        need = sum(src.numel() for src in sources if src.device != self.device)
        buffer = self.staging[slot]
        if buffer is None or buffer.numel() < need:
            if self.free[slot] is not None:
                self.free[slot].synchronize()  # the old buffer's last reader is done
            with torch.cuda.stream(self.stream):
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                buffer = self.staging[slot] = torch.empty(need, dtype=torch.uint8, device=self.device)
        views, offset = [], 0
        with torch.cuda.stream(self.stream):
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            for src in sources:
                if src.device == self.device:
                    views.append(src)
                    continue
                views.append(copy_to_device(src, self.device, out=buffer[offset : offset + src.numel()]))
                offset += src.numel()
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return views, (copied, slot)

    def prefetch(self, tensors, e0: int, e1: int) -> None:
        self.ahead = (_key(tensors), e0, e1, self.fetch(tensors, e0, e1))

    def take(self, tensors, e0: int, e1: int):
        """The copy `prefetch` started, if it covers experts [e0, e1) of these tensors."""
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead[0] != _key(tensors) or not ahead[1] <= e0 < e1 <= ahead[2]:
            return None
        views, tag = ahead[3]
        first = e0 - ahead[1]
        sizes = [qt.shape[1] * qt.row_bytes for qt in tensors]
        return [v[first * size : (first + e1 - e0) * size] for v, size in zip(views, sizes, strict=True)], tag

    def ready(self, fetched) -> list[torch.Tensor]:
        views, tag = fetched
        torch.cuda.current_stream(self.device).wait_event(tag[0])
        return views

    def release(self, fetched) -> None:
        """The chunk is dequantized: its staging buffer may be written again."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self.free[fetched[1][1]] = done


class _Direct:
    """Chunks already on the device (or copied in the caller's stream, off CUDA: the interpreter)."""

    def __init__(self, device: torch.device):
        self.device = device

    def fetch(self, tensors, e0: int, e1: int):
        return [_expert_range(qt, e0, e1).to(self.device) for qt in tensors], None

    def prefetch(self, tensors, e0: int, e1: int) -> None:
        pass

    def take(self, tensors, e0: int, e1: int):
        return None

    def ready(self, fetched) -> list[torch.Tensor]:
        return fetched[0]

    def release(self, fetched) -> None:
        pass


def _key(tensors) -> tuple:
    return tuple((qt.data.data_ptr(), qt.data.numel()) for qt in tensors)


_stagers: dict[torch.device, _Stager] = {}


def _stager_for(device: torch.device, copied: bool):
    if device.type != "cuda" or not copied:
        return _Direct(device)
    if device not in _stagers:
        _stagers[device] = _Stager(device)
    return _stagers[device]


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
    tokens_of: list[int] | None = None,
    then: tuple[QuantTensor, QuantTensor, QuantTensor] | None = None,
) -> torch.Tensor:
    """Σ_j weights[t, j] · down_e(act(gate_e x_t) · up_e x_t) with e = ids[t, j], on x's device.

    x [T, H]; ids [T, k] int64 (an id outside [0, E), transformers' dropped slot, adds
    nothing); weights [T, k]; gate and up [E, I, H] and down [E, H, I] as QuantTensors of
    Q8_0, Q4_K, Q5_K or Q6_K blocks, on x's device or elsewhere (then copied over a
    chunk at a time).
    Computed in `dtype` with float32 sums; returns float32 [T, H]. `tokens_of`, the
    slots each expert has (when the caller counted them), saves a wait for the device.
    `then`: the gate, up and down of the call expected next (the next layer's), whose
    first chunk is copied while this call's last one computes.
    """
    from tandem.gpu import quant_triton

    device = x.device
    n_tok, hidden = x.shape
    k = ids.shape[1]
    n_experts, inter, _ = gate.shape
    slots = ids.reshape(-1).to(device=device, dtype=torch.int64)
    slots = torch.where((slots >= 0) & (slots < n_experts), slots, n_experts)  # E: dropped
    counts = torch.bincount(slots, minlength=n_experts + 1)[:n_experts]
    if tokens_of is None:
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

    # An expert's blocks (when copied) and its dequantized matrices, alive together; a
    # chunk's range is trimmed to its first and last expert with work.
    chunk, per_expert = _chunk_experts(gate, up, down, device, dtype, chunk_bytes)
    chunks = []
    for e0 in range(0, n_experts, chunk):
        busy = [e for e in range(e0, min(n_experts, e0 + chunk)) if tokens_of[e]]
        if busy:
            chunks.append((busy[0], busy[-1] + 1))
    tensors = (gate, up, down)
    stager = _stager_for(device, per_expert > 0)
    upcoming = stager.take(tensors, *chunks[0]) or stager.fetch(tensors, *chunks[0])
    for c, (e0, e1) in enumerate(chunks):
        blocks = upcoming
        if c + 1 < len(chunks):
            upcoming = stager.fetch(tensors, *chunks[c + 1])  # its copy runs while this chunk computes
        elif then is not None:  # the next call's first chunk, likewise
            n_next = then[0].shape[0]
            stager.prefetch(then, 0, min(n_next, _chunk_experts(*then, device, dtype, chunk_bytes)[0]))
        mats = []
        for qt, b, rows, cols in zip(
            tensors, stager.ready(blocks), (inter, inter, hidden), (hidden, hidden, inter), strict=True
        ):
            dense = quant_triton.dequantize(b, qt.ggml_type, (e1 - e0) * rows, cols, dtype)
            mats.append(dense.view(e1 - e0, rows, cols))
        stager.release(blocks)
        w_gate, w_up, w_down = mats
        xs = padded_x[token_at[e0:e1]]  # [c, most, H]
        h = act_fn(torch.bmm(xs, w_gate.transpose(1, 2))) * torch.bmm(xs, w_up.transpose(1, 2))
        y = torch.bmm(h.to(dtype), w_down.transpose(1, 2)).float()  # [c, most, H]
        out.index_add_(0, token_at[e0:e1].reshape(-1), (y * weight_at[e0:e1, :, None]).reshape(-1, hidden))
    return out[:n_tok]
