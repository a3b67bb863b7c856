"""The C++ CPU engine from Python: one thread pool per process, ops built on it.

Weights reach the engine as QuantTensors (raw GGUF blocks, usually views of the
mapped file); an op keeps a reference to each so the memory outlives it. Inputs
and outputs cross as float32 torch tensors; every check of dtype, shape,
contiguity and expert ids happens here, before an address reaches C++.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tandem.cpu.features import _native, select_prefill, select_variant
from tandem.cpu.system import NUMA_ENV, physical_cores, usable_cores
from tandem.env_switches import switch
from tandem.errors import TandemError, UnsupportedError
from tandem.quant.quant_tensor import QuantTensor

# Below this many tokens per matrix a call takes the 8-bit dot kernels, from it
# on the prefill kernels (when the CPU has them): the dequantized tile then
# serves enough tokens to pay for itself (benchmarks/gemm_crossover.py).
GEMM_MIN_TOKENS_ENV = "TANDEM_CPU_GEMM_MIN_TOKENS"
DEFAULT_GEMM_MIN_TOKENS = 32
# With the avx512 kernels the dot path takes 16-row tiled VNNI kernels for prompt-sized
# calls; on the 16-core Sapphire Rapids machine they beat the AMX-BF16 path up to 64 tokens
# on a 2048 × 2048 Q4_K/Q6_K matrix and up to 512 on a 768 × 2048 one (BENCHMARKS.md).
DEFAULT_GEMM_MIN_TOKENS_TILED = 128
# Q4_K, Q5_K and Q6_K, whose prompt-sized dots run on AMX-INT8 tiles with the amx kernels,
# stay on them at every token count: on the 16-core Sapphire Rapids machine Q4_K's beat the
# AMX-BF16 path at 4-512 tokens on 2048 × 2048 and 768 × 2048 matrices (BENCHMARKS.md).
# Off, they take the bf16 path from gemm_min_tokens on like every other type.
GEMM_INT8_FIRST_ENV = "TANDEM_CPU_GEMM_INT8_FIRST"
# A prompt's attention on AMX-BF16 tiles where the amx kernels run it (head sizes of a
# multiple of 32): q · scale, k, v and the softmax weights rounded to bf16, every sum in
# float32 (kernels/attention_prefill_amx.inc). Off, the float32 kernel.
ATTENTION_BF16_ENV = "TANDEM_CPU_ATTENTION_BF16"

# How far ahead of the block in hand the one-token kernels prefetch weights, bytes
# (0: off). With 16 threads on the 16-core Sapphire Rapids machine 2048 took the
# experts of a decode step from 51.6 to 97.6 GB/s (best of 0, 1024, 2048 and 4096);
# with 2 threads on the 2-core Zen 4 machine it cost Gemma's decode 4-12% (the
# hardware prefetchers keep up there). So it is on from PREFETCH_MIN_THREADS threads.
PREFETCH_ENV = "TANDEM_CPU_PREFETCH"
DEFAULT_PREFETCH_BYTES = 2048
PREFETCH_MIN_THREADS = 8
# Which cache the prefetched lines go to: 0 (L1, prefetcht0), 1 (L2), 2 (the last level).
PREFETCH_LEVEL_ENV = "TANDEM_CPU_PREFETCH_LEVEL"
DEFAULT_PREFETCH_LEVEL = 0
# 1: one-token kernels with a 512-bit form (the avx512 and amx variants': Q4_K, Q5_K, Q6_K and the
# 32-value block types) take it;
# 0: their 256-bit loop, the A/B switch.
DECODE_WIDE_ENV = "TANDEM_CPU_DECODE_WIDE"
# How many streams of rows the one-token kernels walk side by side (csrc/kernels/row_streams.inc):
# each core keeps that many runs of reads in flight. 1 is the plain walk, the A/B switch.
# Eight from 8 engine threads on (on the 16-core Xeon's hybrid decode 5-15% over four on
# Qwen3, DeepSeek-V2-Lite and V3 shapes, BENCHMARKS.md), four below (not measured there).
DECODE_STREAMS_ENV = "TANDEM_CPU_DECODE_STREAMS"
DEFAULT_DECODE_STREAMS = 8
FEW_THREADS_DECODE_STREAMS = 4
MAX_DECODE_STREAMS = 8
DECODE_LOOPS_ENV = "TANDEM_CPU_DECODE_LOOPS"
DEFAULT_DECODE_LOOPS = 1
DECODE_TASKS_ENV = "TANDEM_CPU_DECODE_TASKS"
DEFAULT_DECODE_TASKS = 4
DECODE_TASK_KIB_ENV = "TANDEM_CPU_DECODE_TASK_KIB"
DEFAULT_DECODE_TASK_KIB = 256
# 1: a fused decode layer's o projection runs by kv-head groups of columns inside the
# attention's parallel loop, each group as soon as its heads are done (the A/B switch; off
# until measured on a many-core machine).
DECODE_O_GROUPS_ENV = "TANDEM_CPU_DECODE_O_GROUPS"

# How long the pool's idle workers spin before parking, microseconds. Between
# two engine calls of a decode step torch runs on the calling thread alone, so
# spinning workers cost no one anything, while a parked one delays the next
# call by a wake-up; calls with many tokens let the workers park at once.
# NUMA ($NUMA_ENV): "auto" groups the pool's threads by the node of their cores, each group
# owning its share of every weight matrix's rows (placed on its node at load,
# engine/numa.h); "off" makes one group; N >= 2 simulates N nodes on any machine (tests
# of the node-by-node task order: every group's memory stays on the node it is on).
SPIN_ENV = "TANDEM_CPU_SPIN_US"
DEFAULT_SPIN_US = 200
# The spin once the engine serves a model on a GPU (CPUEngine.serve_gpu_steps): on the
# 16-core Xeon, hybrid decode went from 25.0 to 31.4 tok/s with 5000 (BENCHMARKS.md).
GPU_STEP_SPIN_US = 5000
# After how long idle the spinning workers (and a mailbox thread) yield their cores between
# polls, microseconds (-1: never, the CPU default). A GPU model's decode loop runs Python
# on a thread outside the pool between steps, on a core one of them spins on; between two
# layers' calls of a step (under 0.1 ms of GPU work) they still spin without yielding.
YIELD_ENV = "TANDEM_CPU_YIELD_US"
GPU_STEP_YIELD_US = 100


def _int_env(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise TandemError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise TandemError(f"{name} must be in {low} ... {high}, got {value}")
    return value


def numa_groups() -> int:
    """$TANDEM_CPU_NUMA as the pool's node_groups: auto 0, off 1, N >= 2 simulated nodes."""
    raw = os.environ.get(NUMA_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return 0
    if raw in ("off", "0", "1"):
        return 1
    if raw.isdigit() and 2 <= int(raw) <= 4096:
        return int(raw)
    raise TandemError(
        f"{NUMA_ENV} must be auto, off or a node count 2 ... 4096, got {os.environ[NUMA_ENV]!r}"
    )


def default_threads() -> int:
    """One thread per physical core this process may use: hyper-thread pairs share vector units."""
    return max(1, min(physical_cores() or usable_cores(), usable_cores()))


class CPUEngine:
    """A thread pool plus the kernel variant chosen for this CPU."""

    def __init__(
        self,
        threads: int | None = None,
        variant: str | None = None,
        pin: bool = True,
        prefill: str | None = None,
        gemm_min_tokens: int | None = None,
        gemm_int8_first: bool | None = None,
        attention_bf16: bool | None = None,
        node_groups: int | None = None,
    ):
        self.variant = select_variant(override=variant)
        self.kernels = self.variant  # the dot kernels' table (the amx one adds AMX-INT8 tiles to avx512's)
        if self.kernels not in _native().variants_built():
            raise TandemError(f"CPU kernel variant {self.kernels!r} is not built into tandem._cpu")
        self.prefill = select_prefill(self.variant, override=prefill)
        if self.prefill and self.prefill not in _native().gemm_built():
            raise TandemError(f"prefill kernels {self.prefill!r} are not built into tandem._cpu")
        if gemm_min_tokens is None:
            default = (
                DEFAULT_GEMM_MIN_TOKENS_TILED
                if self.kernels in ("avx512", "amx")
                else DEFAULT_GEMM_MIN_TOKENS
            )
            gemm_min_tokens = _int_env(GEMM_MIN_TOKENS_ENV, default, 1, 1 << 30)
        if gemm_min_tokens < 1:
            raise TandemError(f"gemm_min_tokens must be at least 1, got {gemm_min_tokens}")
        self.gemm_min_tokens = gemm_min_tokens
        self.gemm_int8_first = (
            switch(GEMM_INT8_FIRST_ENV, default=True) if gemm_int8_first is None else gemm_int8_first
        )
        self.attention_bf16 = (
            switch(ATTENTION_BF16_ENV, default=True) if attention_bf16 is None else attention_bf16
        )
        self.spin_us = _int_env(SPIN_ENV, DEFAULT_SPIN_US, 0, 1_000_000)
        self.threads = threads or default_threads()
        if self.threads < 1:
            raise TandemError(f"threads must be at least 1, got {self.threads}")
        default = DEFAULT_PREFETCH_BYTES if self.threads >= PREFETCH_MIN_THREADS else 0
        self.prefetch = _int_env(PREFETCH_ENV, default, 0, 1 << 20)
        self.prefetch_level = _int_env(PREFETCH_LEVEL_ENV, DEFAULT_PREFETCH_LEVEL, 0, 2)
        self.decode_wide = switch(DECODE_WIDE_ENV, default=True)
        streams = (
            DEFAULT_DECODE_STREAMS if self.threads >= PREFETCH_MIN_THREADS else FEW_THREADS_DECODE_STREAMS
        )
        self.decode_streams = _int_env(DECODE_STREAMS_ENV, streams, 1, MAX_DECODE_STREAMS)
        self.decode_loops = _int_env(DECODE_LOOPS_ENV, DEFAULT_DECODE_LOOPS, 1, 2)
        self.decode_tasks = _int_env(DECODE_TASKS_ENV, DEFAULT_DECODE_TASKS, 1, 64)
        self.decode_task_kib = _int_env(DECODE_TASK_KIB_ENV, DEFAULT_DECODE_TASK_KIB, 16, 1 << 20)
        self.decode_o_groups = switch(DECODE_O_GROUPS_ENV, default=False)
        # process-wide: the last engine made sets them
        _native().set_decode_prefetch(self.prefetch, self.prefetch_level)
        _native().set_decode_wide(self.decode_wide)
        _native().set_decode_streams(self.decode_streams)
        _native().set_decode_split(self.decode_loops == 1, self.decode_tasks, self.decode_task_kib << 10)
        _native().set_decode_output_by_groups(self.decode_o_groups)
        self.node_groups = numa_groups() if node_groups is None else node_groups
        # Pinning more threads than cores would stack two on one core for good.
        self.pool = _native().ThreadPool(
            self.threads, pin and self.threads <= usable_cores(), self.spin_us, self.node_groups
        )

    def supports(self, ggml_type) -> bool:
        return int(ggml_type) in _native().kernel_types(self.kernels)

    def linear(self, weight: QuantTensor) -> EngineLinear:
        return EngineLinear(self, weight)

    def experts(self, gate: QuantTensor, up: QuantTensor, down: QuantTensor) -> EngineExperts:
        return EngineExperts(self, gate, up, down)

    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x², -1) + eps) * scale for contiguous float32 CPU x [..., n] and scale [n]."""
        n = x.shape[-1]
        if (
            x.dtype != torch.float32
            or scale.dtype != torch.float32
            or x.device.type != "cpu"
            or scale.device.type != "cpu"
            or not x.is_contiguous()
            or not scale.is_contiguous()
            or scale.shape != (n,)
        ):
            raise ValueError("rms_norm: contiguous float32 CPU tensors x [..., n] and scale [n] expected")
        out = torch.empty_like(x)
        _native().rms_norm(
            self.pool, self.kernels, x.data_ptr(), scale.data_ptr(), x.numel() // n, n, eps, out.data_ptr()
        )
        return out

    def attention_bf16_runs(self, d: int = 128, dv: int = 128) -> bool:
        """Whether a prompt's attention with these head sizes runs on the AMX-BF16 kernel."""
        return self.attention_bf16 and _native().attention_prefill_bf16_applies(self.kernels, d, dv)

    def attention_prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int = 0
    ) -> torch.Tensor | None:
        """A prompt's causal grouped-query attention: q [1, Hq, T, D], k [1, Hkv, K, D],
        v [1, Hkv, K, Dv] float32 CPU (last dimension contiguous, any other strides), K >= T, the
        last T keys being the prompt's own (the first K - T a cached prefix) -> [1, T, Hq, Dv];
        window > 0 limits each query to its last `window` keys. None outside that form."""
        if (
            q.dim() != 4
            or k.dim() != 4
            or v.dim() != 4
            or q.shape[0] != 1
            or k.shape[0] != 1
            or v.shape[:3] != k.shape[:3]
            or q.shape[2] > k.shape[2]
            or q.shape[3] != k.shape[3]
            or k.shape[1] == 0
            or q.shape[1] % k.shape[1]
            or q.shape[2] == 0
            or window < 0
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (q, k, v))
            or any(t.stride(3) != 1 for t in (q, k, v))
        ):
            return None
        n_q, t, d = q.shape[1], q.shape[2], q.shape[3]
        n_kv, dv = k.shape[1], v.shape[3]
        out = torch.empty(1, t, n_q, dv, dtype=torch.float32)
        _native().attention_prefill(
            self.pool,
            self.kernels,
            q.data_ptr(),
            q.stride(1),
            q.stride(2),
            k.data_ptr(),
            k.stride(1),
            k.stride(2),
            v.data_ptr(),
            v.stride(1),
            v.stride(2),
            out.data_ptr(),
            dv,
            n_q * dv,
            t,
            n_q,
            n_kv,
            d,
            dv,
            window,
            scale,
            k.shape[2] - t,
            self.attention_bf16,
        )
        return out

    def softmax_top_k(
        self, logits: torch.Tensor, k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per row of logits [n, E] (contiguous float32 CPU): softmax, the k most probable experts
        (ties to the lower id, falling order), optionally renormalised -> weights [n, k] float32,
        ids [n, k] int64 (-1 where a NaN row left nothing to pick); None outside that form."""
        if (
            logits.dim() != 2
            or logits.dtype != torch.float32
            or logits.device.type != "cpu"
            or not logits.is_contiguous()
            or not 1 <= k <= logits.shape[1]
        ):
            return None
        n, experts = logits.shape
        weights = torch.empty(n, k, dtype=torch.float32)
        ids = torch.empty(n, k, dtype=torch.int64)
        _native().softmax_top_k(
            self.pool, logits.data_ptr(), n, experts, k, renormalize, ids.data_ptr(), weights.data_ptr()
        )
        return weights, ids

    def rope_half(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """x · cos + rotate_half(x) · sin for x [B, H, T, D] float32 CPU (D contiguous, any other
        strides) and cos, sin [B or 1, T, D] contiguous float32; None outside that form."""
        if (
            x.dim() != 4
            or cos.dim() != 3
            or cos.shape != sin.shape
            or cos.shape[0] not in (1, x.shape[0])
            or cos.shape[1:] != (x.shape[2], x.shape[3])
            or x.shape[3] % 2
            or x.numel() == 0
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (x, cos, sin))
            or x.stride(3) != 1
            or not cos.is_contiguous()
            or not sin.is_contiguous()
        ):
            return None
        out = torch.empty_like(x)  # same strides as x where x is dense
        if out.stride(3) != 1:
            return None
        b, h, t, d = x.shape
        _native().rope_half(
            self.pool,
            x.data_ptr(),
            out.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            b,
            h,
            t,
            d,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            t * d if cos.shape[0] > 1 else 0,
        )
        return out

    def head_matvec(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per head h: a[h] [rows, k] @ x[h] [k] -> [heads, rows], float32 on the CPU; a's rows
        contiguous (its heads may lie further apart), x contiguous."""
        heads, rows, k = a.shape
        if (
            a.dtype != torch.float32
            or x.dtype != torch.float32
            or a.device.type != "cpu"
            or x.device.type != "cpu"
            or x.shape != (heads, k)
            or not x.is_contiguous()
            or a.stride(2) != 1
            or a.stride(1) != k
        ):
            raise ValueError(
                "head_matvec: float32 CPU a [heads, rows, k] with contiguous rows and x [heads, k]"
            )
        out = torch.empty(heads, rows, dtype=torch.float32)
        _native().head_matvec(
            self.pool, self.kernels, a.data_ptr(), a.stride(0), x.data_ptr(), out.data_ptr(), heads, rows, k
        )
        return out

    def attention_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor | None:
        """One position's grouped-query attention over the cache: q [1, Hq, 1, D], k [1, Hkv, T, D],
        v [1, Hkv, T, Dv] float32 CPU -> [1, 1, Hq, Dv]; None when the tensors are outside that form."""
        if (
            q.dim() != 4
            or k.dim() != 4
            or v.dim() != 4
            or q.shape[0] != 1
            or q.shape[2] != 1
            or k.shape[0] != 1
            or v.shape[:3] != k.shape[:3]
            or q.shape[3] != k.shape[3]
            or k.shape[1] == 0
            or k.shape[2] == 0
            or q.shape[1] % k.shape[1]
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (q, k, v))
            or k.stride(3) != 1
            or v.stride(3) != 1
        ):
            return None
        q = q.contiguous()
        n_q, d = q.shape[1], q.shape[3]
        n_kv, t, dv = k.shape[1], k.shape[2], v.shape[3]
        out = torch.empty(1, 1, n_q, dv, dtype=torch.float32)
        _native().attention_decode(
            self.pool,
            self.kernels,
            q.data_ptr(),
            n_q,
            d,
            k.data_ptr(),
            v.data_ptr(),
            n_kv,
            t,
            dv,
            k.stride(1),
            k.stride(2),
            v.stride(1),
            v.stride(2),
            float(scale),
            out.data_ptr(),
        )
        return out

    def decode_layer(self, spec):
        """A fused decode layer (tandem._cpu.DecodeLayer) on this engine's pool and kernels."""
        return _native().DecodeLayer(self.pool, self.kernels, spec)

    def set_spin_us(self, spin_us: int) -> None:
        """How long idle workers spin before parking, from their next idle period on."""
        self.pool.set_spin_us(spin_us)
        self.spin_us = spin_us

    def serve_gpu_steps(self) -> None:
        """Tune the pool for calls queued from a GPU's stream (hybrid decode), unless
        $TANDEM_CPU_SPIN_US chose: between two layers' calls the GPU works for a fraction
        of a millisecond, so workers that spin through it skip a wake-up per layer."""
        if SPIN_ENV not in os.environ and self.spin_us < GPU_STEP_SPIN_US:
            self.set_spin_us(GPU_STEP_SPIN_US)
        self.pool.yield_us = self.gpu_step_yield_us()

    @staticmethod
    def gpu_step_yield_us() -> int:
        """$TANDEM_CPU_YIELD_US, else GPU_STEP_YIELD_US."""
        return _int_env(YIELD_ENV, GPU_STEP_YIELD_US, -1, 1_000_000)

    def step_mailbox(self, words: torch.Tensor):
        """A thread that runs the calls a CUDA stream requests through words[0] (request)
        and words[1] (done), contiguous int32 CPU memory that must outlive it (the C++
        StepMailbox; tandem.gpu.mailbox queues the stream's side). It polls without
        sleeping for as long as the pool's workers spin, from the core of the pool's
        thread 0, as which it leads the calls' parallel loops."""
        if (
            words.dtype != torch.int32
            or words.device.type != "cpu"
            or not words.is_contiguous()
            or words.numel() < 2
        ):
            raise ValueError("mailbox words must be at least two contiguous int32 CPU words")
        cpus = list(self.pool.cpus)  # pinned to the core of the pool's thread 0, which it acts as
        native = _native().StepMailbox(
            words.data_ptr(),
            max(self.spin_us, GPU_STEP_SPIN_US),
            cpu=cpus[0] if cpus else -1,
            yield_us=self.gpu_step_yield_us(),
        )
        return StepMailbox(native, words)

    def read_bandwidth(self, n_bytes: int = 1 << 30, repeats: int = 3) -> float:
        """Read bandwidth of this pool's threads, bytes per second (best of `repeats`)."""
        buffer = torch.ones(n_bytes, dtype=torch.uint8)  # written, so every page is mapped
        return float(_native().read_bandwidth(self.pool, self.kernels, buffer.data_ptr(), n_bytes, repeats))

    def __repr__(self) -> str:
        return (
            f"CPUEngine(threads={self.threads}, variant={self.variant}, kernels={self.kernels}, "
            f"prefill={self.prefill or 'off'})"
        )


def _check_type(engine: CPUEngine, qt: QuantTensor) -> None:
    if not engine.supports(qt.ggml_type):
        raise UnsupportedError(
            f"tensor {qt.name!r}: the CPU engine has no {qt.ggml_type.name} kernel; "
            "use the torch operators for it (see docs/rules.md)"
        )


def _as_input(x: torch.Tensor, features: int, name: str) -> torch.Tensor:
    if x.shape[-1] != features:
        raise ValueError(f"{name}: expected {features} input features, got {x.shape[-1]}")
    return x.detach().to(device="cpu", dtype=torch.float32).reshape(-1, features).contiguous()


class EngineLinear:
    """y = x W^T on the engine; W: QuantTensor [out, in]."""

    def __init__(self, engine: CPUEngine, weight: QuantTensor):
        if len(weight.shape) != 2:
            raise ValueError(f"tensor {weight.name!r}: a linear weight is 2-D, got {list(weight.shape)}")
        _check_type(engine, weight)
        self.engine = engine
        self.weight = weight  # keeps the blocks alive for the native op
        self.out_features, self.in_features = weight.shape
        data = weight.data.contiguous()
        self._data = data
        _native().prefault(engine.pool, data.data_ptr(), data.numel())
        try:
            self._op = _native().LinearOp(
                engine.pool,
                engine.kernels,
                data.data_ptr(),
                int(weight.ggml_type),
                *weight.shape,
                engine.prefill,
                engine.gemm_min_tokens,
                engine.gemm_int8_first,
            )
        except ValueError as error:
            raise UnsupportedError(f"tensor {weight.name!r}: {error}") from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out] float32
        flat = _as_input(x, self.in_features, self.weight.name)
        out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32)
        self._op.forward(flat.data_ptr(), flat.shape[0], self.in_features, out.data_ptr())
        return out.reshape(*x.shape[:-1], self.out_features)


class EngineExperts:
    """Routed experts of one layer on the engine: gate, up [E, I, H] and down [E, H, I] QuantTensors."""

    def __init__(self, engine: CPUEngine, gate: QuantTensor, up: QuantTensor, down: QuantTensor):
        for qt in (gate, up, down):
            if len(qt.shape) != 3:
                raise ValueError(f"tensor {qt.name!r}: stacked experts are 3-D, got {list(qt.shape)}")
            _check_type(engine, qt)
        self.n_experts, self.inter, self.hidden = gate.shape
        if tuple(up.shape) != tuple(gate.shape) or tuple(down.shape) != (
            self.n_experts,
            self.hidden,
            self.inter,
        ):
            raise ValueError(
                f"experts: gate {list(gate.shape)}, up {list(up.shape)} and down {list(down.shape)} disagree"
            )
        self.engine = engine
        self.tensors = tuple(qt.data.contiguous() for qt in (gate, up, down))  # kept alive for the op
        for data in self.tensors:  # map the file's pages now, not one fault per 4 KiB at decode
            _native().prefault(engine.pool, data.data_ptr(), data.numel())
        args = []
        for qt, data in zip((gate, up, down), self.tensors, strict=True):
            args += [data.data_ptr(), int(qt.ggml_type)]
        try:
            self._op = _native().MoEOp(
                engine.pool,
                engine.kernels,
                self.n_experts,
                self.hidden,
                self.inter,
                *args,
                engine.prefill,
                engine.gemm_min_tokens,
                engine.gemm_int8_first,
            )
        except ValueError as error:
            raise UnsupportedError(f"experts {gate.name!r}: {error}") from None
        self._lock = threading.Lock()
        self._pending: tuple | None = None  # tensors of a submitted call, alive until sync

    def _prepare(self, x, ids, weights, pinned: bool = False):
        flat = _as_input(x, self.hidden, "experts")
        n = flat.shape[0]
        k = ids.shape[-1] if ids.dim() else 0
        ids = ids.detach().to(device="cpu", dtype=torch.int64).reshape(n, k).contiguous()
        w = weights.detach().to(device="cpu", dtype=torch.float32).reshape(n, k).contiguous()
        if ids.shape != w.shape:
            raise ValueError(f"experts: ids {list(ids.shape)} and weights {list(w.shape)} differ")
        # transformers marks dropped slots with id E, which the engine skips; anything else is a bug.
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.n_experts):
            raise IndexError(f"experts: expert id outside [0, {self.n_experts})")
        out = torch.empty(n, self.hidden, dtype=torch.float32, pin_memory=pinned)
        return flat, ids, w, out

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, k], weights [T, k] -> [T, H] float32."""
        flat, ids, w, out = self._prepare(x, ids, weights)
        self._op.forward(
            flat.shape[0], ids.shape[1], flat.data_ptr(), ids.data_ptr(), w.data_ptr(), out.data_ptr()
        )
        return out.reshape(x.shape)

    def submit(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, pinned_output: bool = False
    ) -> None:
        """Start the call on the pool's driver thread and return at once; sync() returns the
        result (in page-locked memory with `pinned_output`, for a copy to a GPU that does
        not wait)."""
        with self._lock:
            if self._pending is not None:
                raise TandemError("experts: submit() called twice without sync()")
            flat, ids, w, out = self._prepare(x, ids, weights, pinned_output)
            self._pending = (flat, ids, w, out, x.shape)
            self._op.submit(
                flat.shape[0], ids.shape[1], flat.data_ptr(), ids.data_ptr(), w.data_ptr(), out.data_ptr()
            )

    def sync(self) -> torch.Tensor:
        """Wait for the submitted call; its output [T, H]."""
        with self._lock:
            if self._pending is None:
                raise TandemError("experts: sync() without submit()")
            self._op.sync()
            _, _, _, out, shape = self._pending
            self._pending = None
            return out.reshape(shape)

    def host_call(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor):
        """A native call record over fixed buffers, for plain C callers (a CUDA stream's host functions).

        The buffers must be contiguous CPU tensors (x, out float32 [T, H]; ids int64 and weights
        float32 [T, k]) that outlive the record; their contents are read when the call runs.
        Call `host_submit_fn()` / `host_sync_fn()` with `record.address`.
        """
        for t, dtype in (
            (x, torch.float32),
            (ids, torch.int64),
            (weights, torch.float32),
            (out, torch.float32),
        ):
            if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(
                    "experts: host_call buffers must be contiguous CPU tensors of the stated dtypes"
                )
        n, k = ids.shape
        if x.shape != (n, self.hidden) or out.shape != (n, self.hidden) or weights.shape != (n, k):
            raise ValueError("experts: host_call buffer shapes disagree")
        record = self._op.host_call(n, k, x.data_ptr(), ids.data_ptr(), weights.data_ptr(), out.data_ptr())
        return HostCall(record, (x, ids, weights, out))


class StepMailbox:
    """The native serving thread and its words: the thread stops before the words go."""

    def __init__(self, native, words: torch.Tensor):
        self._native = native
        self.words = words

    def add(self, fn_address: int, data_address: int) -> int:
        """Register fn(data); returns the code a request names it by (1, 2, ...)."""
        return int(self._native.add(fn_address, data_address))

    @property
    def served(self) -> int:
        return int(self._native.served)

    @property
    def failed(self) -> int:
        """Requests answered without a call: unknown codes, or calls that threw."""
        return int(self._native.failed)

    @property
    def dry(self) -> bool:
        """Whether requests are answered without running their calls (benchmarks time the
        hand-over alone with it; the outputs keep what they held)."""
        return bool(self._native.dry)

    @dry.setter
    def dry(self, value: bool) -> None:
        self._native.dry = bool(value)

    def __del__(self) -> None:
        self._native = None  # joins the thread while the words still exist


class HostCall:
    """A native MoE call record and the buffers it points into (kept alive with it)."""

    def __init__(self, record, buffers: tuple[torch.Tensor, ...]):
        self._record = record
        self.buffers = buffers
        self.address = int(record.address)


def dequantize_rows(weight: QuantTensor, ids: torch.Tensor) -> torch.Tensor | None:
    """Rows `ids` (int64, checked by the caller) of a 2-D QuantTensor as float32 [n, cols], by the
    engine's scalar dequantization; None when the type has none or the extension is missing."""
    try:
        native = _native()
    except TandemError:
        return None
    if len(weight.shape) != 2 or not native.dequant_rows_supported(int(weight.ggml_type)):
        return None
    ids = ids.to(torch.int64).contiguous()
    data = weight.data.contiguous()
    out = torch.empty(ids.numel(), weight.shape[1], dtype=torch.float32)
    native.dequantize_rows(
        int(weight.ggml_type),
        data.data_ptr(),
        weight.row_bytes,
        ids.data_ptr(),
        ids.numel(),
        weight.shape[1],
        out.data_ptr(),
    )
    return out


def decode_layer_spec():
    """An empty tandem._cpu.DecodeLayerSpec to fill (tandem.ops.decode_layer_cpu)."""
    return _native().DecodeLayerSpec()


def host_submit_fn() -> int:
    """Address of `void(void*)` submitting a host_call record: for cudaLaunchHostFunc."""
    return int(_native().host_submit_fn())


def host_sync_fn() -> int:
    """Address of `void(void*)` waiting for a host_call record's op."""
    return int(_native().host_sync_fn())


def host_run_fn() -> int:
    """Address of `void(void*)` running a host_call record's call on the calling thread (it waits)."""
    return int(_native().host_run_fn())


_default: CPUEngine | None = None
_default_lock = threading.Lock()
# The switch to the torch reference: with the engine off, the CPU operators
# (QuantLinearCPU, ExpertsCPU) dequantize and run torch, as QuantLinear does.
ENGINE_ENV = "TANDEM_CPU_ENGINE"
_enabled = os.environ.get(ENGINE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def enabled() -> bool:
    """Whether CPU operators loaded from now on use the C++ engine ($TANDEM_CPU_ENGINE=0 turns it off)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the engine on or off for operators loaded from now on (the reference switch)."""
    global _enabled
    _enabled = bool(flag)


@contextmanager
def torch_reference() -> Iterator[None]:
    """Operators loaded inside take the torch reference path."""
    was = enabled()
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(was)


def configure(threads: int | None = None, variant: str | None = None) -> CPUEngine:
    """Replace the process's default engine (the CLI's --threads); ops made before keep theirs."""
    global _default
    with _default_lock:
        _default = CPUEngine(threads=threads, variant=variant)
        return _default


def default_engine() -> CPUEngine:
    """The process's engine, made on first use with one thread per physical core."""
    global _default
    with _default_lock:
        if _default is None:
            _default = CPUEngine()
        return _default
