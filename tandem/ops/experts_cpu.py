"""Routed experts on tandem's C++ CPU engine: one native call per layer, no Python per expert.

Same contract as tandem.ops.experts.QuantExperts (the torch reference it extends):
`experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, so a
rule swaps the experts module alone and the router and shared experts stay.

In a model on a CUDA GPU (the hybrid placement), a call of up to STREAM_MAX_TOKENS
tokens runs in the stream's order instead of waiting for the GPU: the hidden states,
ids and weights are copied into pinned buffers, the stream hands the engine's call to
a serving thread through two host words and waits for its answer (tandem.gpu.mailbox;
or as a host function, tandem.gpu.cudart), and the result is copied back, all on the
stream.
Python returns at once, and a CUDA graph captured around it replays the experts with
the rest of the step (tandem.engine.graph_decode).

A call of `prefill_on_gpu_from` tokens or more in such a model (a long prompt; default
DEFAULT_PREFILL_ON_GPU_FROM, or $TANDEM_GPU_PREFILL_EXPERTS for every layer, 0: never)
divides the layer's experts: some copied to the GPU and computed there
(tandem.gpu.moe_batched), the rest on the engine at the same time
(tandem.gpu.prefill_split). The blocks are page-locked for that on first use.
"""

from __future__ import annotations

import os
import time
import weakref

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.cpu.engine import default_engine
from tandem.cpu.engine import enabled as engine_enabled
from tandem.errors import RuleError
from tandem.ops.experts import QuantExperts
from tandem.weights.source import GGUFWeights

# The engine's fused op computes down(silu(gate) * up).
SILU_NAMES = ("silu", "swish")
# Tokens per call from which a GPU model's experts wait for the GPU instead (prompts).
STREAM_MAX_TOKENS = 8
# Tokens per call from which a GPU model's experts are computed on the GPU (0: never).
PREFILL_ON_GPU_ENV = "TANDEM_GPU_PREFILL_EXPERTS"
# On the H200 and its 16-core Xeon, one Qwen3-30B-A3B layer's experts took the engine
# 11.0 ms at 128 tokens and the GPU with the copies 9.5 (4.7 and 9.7 at 32 tokens);
# below, the calls stay on the engine. Above, prefill_split divides them.
DEFAULT_PREFILL_ON_GPU_FROM = 128
# A sync that took longer waited for the engine (its time is then the elapsed time).
SYNC_WAITED_S = 100e-6


class ExpertsCPU(QuantExperts):
    """QuantExperts computed by the engine.

    generate_op: "engine" (default) or "torch" (the reference). With "engine", experts
    whose weight types have no engine kernel, or whose activation is not SiLU, take
    the torch path; `backend` says which one a layer got.
    """

    OPS = (None, "engine", "torch")

    def __init__(
        self,
        key: str,
        orig: nn.Module,
        config: PretrainedConfig,
        *,
        prefill_on_gpu_from: int | None = None,
        **kwargs,
    ):
        super().__init__(key, orig, config, **kwargs)
        if prefill_on_gpu_from is None:
            value = os.environ.get(PREFILL_ON_GPU_ENV, str(DEFAULT_PREFILL_ON_GPU_FROM)).strip() or "0"
            if not value.isdigit():
                raise RuleError(f"${PREFILL_ON_GPU_ENV} must be a token count, got {value!r}")
            prefill_on_gpu_from = int(value)
        if (
            isinstance(prefill_on_gpu_from, bool)
            or not isinstance(prefill_on_gpu_from, int)
            or prefill_on_gpu_from < 0
        ):
            raise RuleError(f"{key}: prefill_on_gpu_from must be a token count, got {prefill_on_gpu_from!r}")
        self.prefill_on_gpu_from = prefill_on_gpu_from
        self._pinned: bool | None = None  # whether the blocks are page-locked (None: not tried)
        self._gpu_timing: tuple | None = None  # events around the last prompt's GPU share
        if self.generate_device.type != "cpu":
            raise RuleError(
                f"{key}: ExpertsCPU runs on the CPU, not {self.generate_device}; use QuantExperts"
            )
        silu = getattr(config, "hidden_act", None) in SILU_NAMES
        use_engine = self.generate_op != "torch" and engine_enabled() and silu and self.dtype == torch.float32
        self.backend = "engine" if use_engine else "torch"
        self.engine_experts = None
        self._streamed: dict[tuple[int, int], StreamCall] = {}  # (tokens, k) -> its buffers and call

    @property
    def capturable(self) -> bool:
        """On the engine, a GPU model's decode call runs in stream order (see the module's docstring)."""
        return self.engine_experts is not None

    def load(self, weights: GGUFWeights) -> None:
        super().load(weights)
        if self.backend == "engine":
            engine = default_engine()
            if all(engine.supports(t.ggml_type) for t in (self.gate, self.up, self.down)):
                self.engine_experts = engine.experts(self.gate, self.up, self.down)
            else:
                self.backend = "torch"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # [T, H], [T, k], [T, k] -> [T, H]
        if self.engine_experts is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        if hidden_states.device.type == "cuda" and hidden_states.shape[0] <= STREAM_MAX_TOKENS:
            return self._in_stream(hidden_states, top_k_index, top_k_weights)
        if hidden_states.device.type == "cuda" and self._prefill_on_gpu(hidden_states.shape[0]):
            return self._on_gpu(hidden_states, top_k_index, top_k_weights)
        out = self.engine_experts(hidden_states, top_k_index, top_k_weights)
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def _prefill_on_gpu(self, n_tok: int) -> bool:
        if not self.prefill_on_gpu_from or n_tok < self.prefill_on_gpu_from:
            return False
        from tandem.ops.linear_gpu import triton_kernels

        quant_triton = triton_kernels()
        return all(
            quant_triton.supports(qt.ggml_type, qt.shape[-1]) for qt in (self.gate, self.up, self.down)
        )

    def _on_gpu(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The layer's experts divided: those below a cut copied to the GPU chunk by chunk and
        computed there, the rest on the engine at the same time (tandem.gpu.prefill_split)."""
        from tandem.gpu.cudart import register_host_memory, unregister_host_memory
        from tandem.gpu.moe_batched import batched_experts
        from tandem.gpu.prefill_split import split_enabled, split_of

        if self._pinned is None:
            ranges = [register_host_memory(qt.data) for qt in (self.gate, self.up, self.down)]
            self._pinned = all(r is not None for r in ranges)
            # Unlocked with this module, while its blocks' mapping still exists.
            weakref.finalize(self, unregister_host_memory, [p for r in ranges if r for p in r])
        n, n_experts = hidden.shape[0], self.num_experts
        flat = hidden.reshape(n, self.hidden_size)
        ids = ids.reshape(n, -1)
        weights = weights.reshape(n, -1)
        valid = (ids >= 0) & (ids < n_experts)
        tokens_of = torch.bincount(ids[valid].reshape(-1), minlength=n_experts).tolist()
        engine = self.engine_experts.engine
        expert_bytes = sum(qt.n_bytes for qt in (self.gate, self.up, self.down)) // n_experts
        split = split_of(engine, expert_bytes)
        cut = split.cut(tokens_of) if split_enabled() else n_experts
        cpu_slots = sum(tokens_of[cut:])
        started = time.perf_counter()
        if cpu_slots:  # the engine's share first: it runs on the pool while the GPU works
            on_cpu = torch.where(ids >= cut, ids, n_experts)  # id E: a dropped slot, skipped
            self.engine_experts.submit(
                flat.float().cpu(), on_cpu.cpu(), weights.float().cpu(), pinned_output=True
            )
        gpu_experts = sum(1 for c in tokens_of[:cut] if c)
        # The previous call's GPU time is read now, when its events are long done: no wait.
        if self._gpu_timing is not None:
            start, end, experts = self._gpu_timing
            split.measured(0, 0.0, experts, start.elapsed_time(end) / 1000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        on_gpu = torch.where(ids < cut, ids, n_experts)
        gpu_counts = tokens_of[:cut] + [0] * (n_experts - cut)
        following = self._learn_order()
        out = batched_experts(
            flat, on_gpu, weights, self.gate, self.up, self.down, self.act_fn, tokens_of=gpu_counts,
            then=None if following is None else (following.gate, following.up, following.down),
        )  # fmt: skip
        end.record()
        self._gpu_timing = (start, end, gpu_experts)
        if cpu_slots:
            queued = time.perf_counter()
            cpu_out = self.engine_experts.sync()
            done = time.perf_counter()
            split.engine_timed(cpu_slots, done - started, waited=done - queued > SYNC_WAITED_S)
            out += cpu_out.to(out.device, non_blocking=True)  # page-locked: the host goes on
        return out.reshape(hidden.shape).to(hidden.dtype)

    # The layer whose prompt call came last, and each layer's successor seen so far: a
    # prompt's layers follow one another in the same order, so a call can start copying
    # the next layer's first chunk while its own last chunk computes.
    _last_on_gpu: weakref.ref | None = None
    _next_on_gpu: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _learn_order(self) -> ExpertsCPU | None:
        """Record this call's place after the previous one; the layer seen after this one."""
        last = ExpertsCPU._last_on_gpu() if ExpertsCPU._last_on_gpu is not None else None
        if last is not None and last is not self:
            ExpertsCPU._next_on_gpu[last] = weakref.ref(self)
        ExpertsCPU._last_on_gpu = weakref.ref(self)
        following = ExpertsCPU._next_on_gpu.get(self)
        return following() if following is not None else None

    def stream_call(self, n: int, k: int) -> StreamCall:
        """The page-locked buffers and the engine's call record for n tokens of k experts on a
        CUDA stream, made on first use (outside a capture: a graph's first run is an ordinary one)."""
        call = self._streamed.get((n, k))
        if call is None:
            call = StreamCall(self.engine_experts, n, k, self.hidden_size)
            self._streamed[(n, k)] = call
        return call

    def _in_stream(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The call queued on the current CUDA stream: copies, the engine's call, copy back."""
        n, k, h = hidden.shape[0], ids.shape[-1], self.hidden_size
        call = self.stream_call(n, k)
        # Ids past the expert count are transformers' dropped slots, which the engine skips;
        # nothing here can check them without waiting for the GPU.
        words = [
            ids.reshape(n * k).long().view(torch.int32),
            hidden.reshape(n * h).float().view(torch.int32),
            weights.reshape(n * k).float().view(torch.int32),
        ]
        call.packed.copy_(torch.cat(words), non_blocking=True)
        call.request()
        return call.finish(hidden.device).reshape(hidden.shape).to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"


class StreamCall:
    """One shape of a GPU model's experts call run by the engine in a CUDA stream's order.

    One page-locked buffer of 32-bit words holds the ids (int64, first: 8-byte aligned),
    the hidden states and the weights, so that one copy (or one kernel writing host
    memory) fills all three; the engine writes `out`. `request()` queues the call on the
    current stream and `finish(device)` the wait for it and the copy of its output: GPU
    work queued in between runs while the engine computes.
    """

    def __init__(self, engine_experts, n: int, k: int, hidden: int):
        from tandem.cpu.engine import host_run_fn
        from tandem.gpu.mailbox import handover, mailbox_of

        engine = engine_experts.engine
        engine.serve_gpu_steps()
        self.packed = torch.empty(2 * n * k + n * hidden + n * k, dtype=torch.int32, pin_memory=True)
        self.ids = self.packed[: 2 * n * k].view(torch.int64).view(n, k)
        self.x = self.packed[2 * n * k : 2 * n * k + n * hidden].view(torch.float32).view(n, hidden)
        self.weights = self.packed[2 * n * k + n * hidden :].view(torch.float32).view(n, k)
        self.out = torch.empty(n, hidden, pin_memory=True)
        self.record = engine_experts.host_call(self.x, self.ids, self.weights, self.out)
        # The mailbox's serving thread or a host function runs the call and leads its
        # parallel loops; the stream waits for it either way.
        self.box = mailbox_of(engine) if handover() == "mailbox" else None
        self.code = self.box.add(host_run_fn(), self.record.address) if self.box is not None else 0

    def request(self) -> None:
        from tandem.cpu.engine import host_run_fn
        from tandem.gpu.cudart import launch_host_func

        if self.box is not None:
            self.box.request(self.code)
        else:  # a host function holds the stream until the call returns
            launch_host_func(host_run_fn(), self.record.address)

    def finish(self, device: torch.device) -> torch.Tensor:
        """-> the output [n, H] float32 on `device`, in stream order."""
        if self.box is not None:
            self.box.wait(self.code)
        return self.out.to(device, non_blocking=True)

    @property
    def signal(self) -> tuple[torch.Tensor, int] | None:
        """(request word, code): what a kernel that fills the inputs writes to ask for the call
        itself, in place of `request()` (tandem.gpu.layer_kernels.route_pack); None where a
        host function runs the call."""
        return (self.box.request_tensor, self.code) if self.box is not None else None

    def finish_sum(self, h: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
        """One token: the wait for the call, then h [1, H] + the output (+ shared) in one
        kernel that reads the output where the engine wrote it and takes the answer
        (tandem.gpu.layer_kernels.expert_sum), in place of `finish` and the adds."""
        from tandem.gpu.layer_kernels import expert_sum

        done = None
        if self.box is not None:
            self.box.wait(self.code, clear=False)
            done = self.box.done_tensor
        flat = expert_sum(
            h.reshape(-1), self.out.reshape(-1), None if shared is None else shared.reshape(-1), done
        )
        return flat.view(h.shape)
