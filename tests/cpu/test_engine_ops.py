"""The engine's linear and MoE ops against torch references, over thread counts and routings.

Bounds (asserted):
- linear: each output within 1e-5 of Σ|w|·|x| of the exact product of the same
  8-bit activation blocks (tandem.cpu.reference), whatever the thread count;
- experts: relative L2 error below 5e-4 against tests/cpu/moe_reference.py
  (same activation steps, float64; not tighter because the engine's silu and
  torch's differ in the last bit, which now and then moves an element of h to
  the neighbouring 8-bit step), and below 3e-2 against the float32 torch
  operator tandem.ops.experts.QuantExperts' arithmetic (dequantized weights,
  unquantized activations).
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from tandem.cpu import kernels, reference
from tandem.cpu.engine import (
    DEFAULT_SPIN_US,
    GPU_STEP_SPIN_US,
    GPU_STEP_YIELD_US,
    PREFETCH_ENV,
    PREFETCH_LEVEL_ENV,
    SPIN_ENV,
    YIELD_ENV,
    CPUEngine,
    host_run_fn,
    host_submit_fn,
    host_sync_fn,
)
from tandem.errors import TandemError, UnsupportedError
from tandem.quant.quant_tensor import QuantTensor
from tandem.synth.random_blocks import random_blocks as model_like_blocks
from tests.cpu.moe_reference import experts_exact
from tests.cpu.variants import testable_variants as _testable_variants

VARIANT = _testable_variants()[0]  # the best this CPU runs; test_kernels.py covers the others
FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
ENGINES: dict[int, CPUEngine] = {}
VARIANT_THREAD_ENGINES: dict[tuple[str, int], CPUEngine] = {}


def variant_engine(variant: str, threads: int) -> CPUEngine:
    key = (variant, threads)
    if key not in VARIANT_THREAD_ENGINES:
        VARIANT_THREAD_ENGINES[key] = CPUEngine(threads=threads, variant=variant, prefill="off")
    return VARIANT_THREAD_ENGINES[key]


def engine(threads: int) -> CPUEngine:
    if threads not in ENGINES:
        # The 8-bit dot kernels for every call; tests/cpu/test_gemm.py covers the prefill path.
        ENGINES[threads] = CPUEngine(threads=threads, variant=None, prefill="off")
    return ENGINES[threads]


def quant(ggml_type: T, shape: tuple[int, ...], seed: int, name: str = "blk.0.test.weight") -> QuantTensor:
    numel = 1
    for d in shape:
        numel *= d
    if ggml_type in FLOAT_DTYPES:
        values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 0.05
        data = values.to(FLOAT_DTYPES[ggml_type]).view(torch.uint8)
    else:  # values of a freshly initialized model's size (std 0.02), every quant bit random
        block, _ = GGML_QUANT_SIZES[ggml_type]
        rng = np.random.default_rng(seed)
        data = torch.from_numpy(model_like_blocks(ggml_type, numel // block, rng).reshape(-1))
    return QuantTensor(data, ggml_type, shape, name)


@pytest.mark.parametrize("ggml_type", [T.F16, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n_tok", [1, 7, 70])
def test_linear_matches_the_reference(ggml_type, threads, n_tok):
    rows, cols = 300, 512
    w = quant(ggml_type, (rows, cols), seed=n_tok + threads)
    x = torch.randn(n_tok, cols, generator=torch.Generator().manual_seed(n_tok))
    out = engine(threads).linear(w)(x)
    fmt = kernels.act_format(engine(threads).kernels, ggml_type)
    exact = reference.dot_rows(w.data, ggml_type, rows, x, fmt)
    magnitude = reference.prepared_activations(x, fmt).abs() @ w.dequantize().double().abs().T
    assert out.shape == (n_tok, rows)
    assert ((out.double() - exact).abs() <= 1e-5 * magnitude + 1e-30).all()


def test_linear_keeps_leading_dimensions_and_takes_other_dtypes():
    w = quant(T.Q8_0, (64, 96), seed=1)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    out = engine(2).linear(w)(x)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out[1, 2], engine(2).linear(w)(x[1, 2:3].float())[0])


def test_linear_refuses_unsupported_types_and_shapes_before_any_work():
    with pytest.raises(UnsupportedError, match="IQ4_XS"):
        engine(1).linear(quant_iq4(8, 256))
    with pytest.raises(ValueError, match="expected 96 input features"):
        engine(1).linear(quant(T.Q8_0, (4, 96), seed=0))(torch.zeros(1, 64))


def quant_iq4(rows: int, cols: int) -> QuantTensor:
    _, size = GGML_QUANT_SIZES[T.IQ4_XS]
    return QuantTensor(
        torch.zeros(rows * cols // 256 * size, dtype=torch.uint8), T.IQ4_XS, (rows, cols), "iq4"
    )


# (gate/up type, down type): the K-quant mix of Q4_K_M files, legacy types and floats.
EXPERT_TYPES = [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0), (T.F16, T.F32), (T.Q5_K, T.Q4_0)]
E, H, INTER = 8, 256, 256


def expert_set(types, seed=0):
    gate_type, down_type = types
    gate = quant(gate_type, (E, INTER, H), seed, "blk.0.ffn_gate_exps.weight")
    up = quant(gate_type, (E, INTER, H), seed + 1, "blk.0.ffn_up_exps.weight")
    down = quant(down_type, (E, H, INTER), seed + 2, "blk.0.ffn_down_exps.weight")
    return gate, up, down


def routing(n: int, k: int, seed: int, skew: str = "random"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    if skew == "one":  # every token to expert 3 (and, for k > 1, expert 5)
        ids = torch.tensor([3, 5, 1, 0][:k]).repeat(n, 1)
    elif skew == "half":  # experts 4..7 receive nothing
        ids = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(n)])
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g)
    return x, ids, weights


def plain_experts(gate, up, down, x, ids, weights):
    """The float32 torch computation of tandem.ops.experts.QuantExperts (dequantized weights)."""
    wg, wu, wd = (qt.dequantize(torch.float32) for qt in (gate, up, down))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < E:
                h = torch.nn.functional.silu(wg[e] @ x[t]) * (wu[e] @ x[t])
                out[t] += weights[t, j] * (wd[e] @ h)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("types", EXPERT_TYPES, ids=lambda t: f"{t[0].name}-{t[1].name}")
@pytest.mark.parametrize("n,k,skew", [(1, 2, "random"), (5, 4, "one"), (33, 2, "half"), (130, 3, "random")])
def test_experts_match_both_references(types, n, k, skew):
    gate, up, down = expert_set(types)
    x, ids, weights = routing(n, k, seed=n, skew=skew)
    out = engine(2).experts(gate, up, down)(x, ids, weights)
    assert rel(out, experts_exact(engine(2).kernels, gate, up, down, x, ids, weights)) < 5e-4
    if n <= 33:
        assert rel(out, plain_experts(gate, up, down, x, ids, weights)) < 3e-2


@pytest.mark.parametrize("n", [1, 64, 1024])
def test_experts_give_identical_results_for_every_thread_count(n):
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=4)
    x, ids, weights = routing(n, 4, seed=9)
    outs = [engine(t).experts(gate, up, down)(x, ids, weights) for t in (1, 2, 3, 4)]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])  # integer sums and slot-ordered reduction: bit-identical
    assert rel(outs[0], experts_exact(engine(1).kernels, gate, up, down, x, ids, weights)) < 5e-4


@pytest.mark.parametrize("types", EXPERT_TYPES, ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_a_token_alone_gets_the_same_bits_as_in_a_batch(types):
    # One token takes the decode loop (forward_one), many the grouped one: same sums, same
    # order, as long as both sides take the per-row kernels (the avx2 variant's). With AVX-512
    # VNNI, an expert with a few tokens takes the 16-row tiled kernels, whose integer sums are
    # the same but whose float sums run in another order: equal to float rounding.
    gate, up, down = expert_set(types, seed=11)
    x, ids, weights = routing(6, 4, seed=12)
    ids[2, 1] = E  # a dropped slot
    ids[4, 3] = ids[4, 0]  # one expert in two slots
    for variant in [v for v in _testable_variants() if v in ("avx2", "avx512", "amx")]:
        op = CPUEngine(threads=3, variant=variant, prefill="off").experts(gate, up, down)
        batch = op(x, ids, weights)
        for t in range(6):
            alone = op(x[t : t + 1], ids[t : t + 1], weights[t : t + 1])[0]
            if variant == "avx2":
                assert torch.equal(alone, batch[t])
            else:
                assert rel(alone, batch[t]) < 1e-6


def test_dropped_slots_are_skipped_and_bad_ids_refused():
    gate, up, down = expert_set((T.Q8_0, T.Q8_0))
    experts = engine(2).experts(gate, up, down)
    x, ids, weights = routing(4, 2, seed=1)
    dropped = ids.clone()
    dropped[:, 1] = E  # transformers marks dropped slots with id E
    out = experts(x, dropped, weights)
    only_first = experts(x, ids[:, :1], weights[:, :1])
    torch.testing.assert_close(out, only_first, rtol=0, atol=0)
    with pytest.raises(IndexError):
        experts(x, ids - 5, weights)


def test_ten_thousand_submit_sync_cycles():
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=2)
    experts = engine(2).experts(gate, up, down)
    x, ids, weights = routing(2, 2, seed=3)
    expected = experts(x, ids, weights)
    for _ in range(10_000):
        experts.submit(x, ids, weights)
        out = experts.sync()
    assert torch.equal(out, expected)
    with pytest.raises(TandemError, match="without submit"):
        experts.sync()


def test_host_functions_run_from_plain_c_pointers():
    # What cudaLaunchHostFunc does with them: call void(void*) with the record's address.
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=5)
    experts = engine(2).experts(gate, up, down)
    x, ids, weights = routing(3, 2, seed=6)
    out = torch.zeros(3, H)
    record = experts.host_call(x.contiguous(), ids.contiguous(), weights.contiguous(), out)
    host_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    submit, sync = host_fn(host_submit_fn()), host_fn(host_sync_fn())
    for step in range(3):  # the same record replayed with new contents, as a CUDA graph does
        x.copy_(routing(3, 2, seed=10 + step)[0])
        submit(record.address)
        sync(record.address)
        torch.testing.assert_close(out, experts(x, ids, weights), rtol=0, atol=0)


def test_the_run_host_function_gives_the_calls_result_on_the_calling_thread():
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=5)
    experts = engine(2).experts(gate, up, down)
    x, ids, weights = routing(2, 2, seed=9)
    out = torch.zeros(2, H)
    record = experts.host_call(x.contiguous(), ids.contiguous(), weights.contiguous(), out)
    run = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(host_run_fn())
    for step in range(3):
        x.copy_(routing(2, 2, seed=20 + step)[0])
        run(record.address)  # returns with the result written
        torch.testing.assert_close(out, experts(x, ids, weights), rtol=0, atol=0)


def test_a_gpu_models_engine_spins_longer_unless_the_environment_chose(monkeypatch):
    monkeypatch.delenv(SPIN_ENV, raising=False)
    tuned = CPUEngine(threads=2, variant=None, prefill="off")
    assert tuned.pool.spin_us == DEFAULT_SPIN_US
    tuned.serve_gpu_steps()
    assert tuned.pool.spin_us == tuned.spin_us == GPU_STEP_SPIN_US
    monkeypatch.setenv(SPIN_ENV, "50")
    chosen = CPUEngine(threads=2, variant=None, prefill="off")
    chosen.serve_gpu_steps()
    assert chosen.pool.spin_us == 50
    with pytest.raises(ValueError, match="spin_us"):
        chosen.pool.set_spin_us(-1)


def test_a_gpu_models_engine_yields_idle_cores_as_the_environment_says(monkeypatch):
    monkeypatch.delenv(YIELD_ENV, raising=False)
    engine = CPUEngine(threads=2, variant=None, prefill="off")
    assert engine.pool.yield_us == -1  # CPU models: the caller is the pool's thread 0, nobody to yield to
    engine.serve_gpu_steps()
    assert engine.pool.yield_us == GPU_STEP_YIELD_US
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=3)
    experts = engine.experts(gate, up, down)
    x, ids, weights = routing(1, 2, seed=4)
    want = experts(x, ids, weights)
    for _ in range(3):  # workers that yielded while idle still run every loop
        time.sleep(0.002)
        torch.testing.assert_close(experts(x, ids, weights), want, rtol=0, atol=0)
    assert rel(want, experts_exact(engine.kernels, gate, up, down, x, ids, weights)) < 5e-4
    monkeypatch.setenv(YIELD_ENV, "-1")
    engine.serve_gpu_steps()
    assert engine.pool.yield_us == -1
    monkeypatch.setenv(YIELD_ENV, "soon")
    with pytest.raises(TandemError, match=YIELD_ENV):
        engine.serve_gpu_steps()


@pytest.mark.parametrize(
    "types",
    [
        (T.Q4_K, T.Q4_K),
        (T.Q4_K, T.Q6_K),
        (T.Q5_K, T.Q5_K),
        (T.Q8_0, T.Q5_0),
        (T.Q4_0, T.Q5_1),
        (T.Q4_1, T.Q8_0),
    ],
    ids=lambda t: f"{t[0].name}-{t[1].name}",
)
def test_the_wide_one_token_kernels_give_the_narrow_ones_results(types, monkeypatch):
    """TANDEM_CPU_DECODE_WIDE (the 512-bit one-token loops of the K-quants Q4_K, Q5_K and
    Q6_K and of the 32-value block types, where the variant has them): the same integer
    sums, float sums in another order."""
    from tandem.cpu.engine import DECODE_WIDE_ENV, _native

    gate, up, down = expert_set(types, seed=13)
    x, ids, weights = routing(1, 4, seed=14)
    outs = {}
    for wide in ("0", "1"):
        monkeypatch.setenv(DECODE_WIDE_ENV, wide)
        engine = CPUEngine(threads=2, variant=None, prefill="off")
        assert _native().decode_wide() == (wide == "1") == engine.decode_wide
        outs[wide] = engine.experts(gate, up, down)(x, ids, weights)
    assert rel(outs["1"], outs["0"]) < 1e-6
    assert rel(outs["1"], experts_exact(engine.kernels, gate, up, down, x, ids, weights)) < 5e-4
    monkeypatch.setenv(DECODE_WIDE_ENV, "wide")
    with pytest.raises(TandemError, match=DECODE_WIDE_ENV):
        CPUEngine(threads=2, variant=None, prefill="off")


def test_decode_streams_give_the_same_experts_bit_for_bit(monkeypatch):
    """TANDEM_CPU_DECODE_STREAMS: how many streams of rows the one-token kernels walk side by
    side; each row keeps its own sums, so the MoE op's result does not change."""
    from tandem.cpu.engine import DECODE_STREAMS_ENV, _native

    gate, up, down = expert_set((T.Q4_K, T.Q6_K), seed=15)
    x, ids, weights = routing(1, 4, seed=16)
    outs = []
    for streams in ("1", "2", "4", "8"):
        monkeypatch.setenv(DECODE_STREAMS_ENV, streams)
        engine = CPUEngine(threads=2, variant=None, prefill="off")
        assert _native().decode_streams() == int(streams) == engine.decode_streams
        outs.append(engine.experts(gate, up, down)(x, ids, weights))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    assert rel(outs[0], experts_exact(engine.kernels, gate, up, down, x, ids, weights)) < 5e-4
    for bad in ("0", "9", "two"):
        monkeypatch.setenv(DECODE_STREAMS_ENV, bad)
        with pytest.raises(TandemError, match=DECODE_STREAMS_ENV):
            CPUEngine(threads=2, variant=None, prefill="off")


def test_the_default_streams_follow_the_thread_count(monkeypatch):
    """Eight streams from 8 engine threads on, four below; the variable overrides both."""
    from tandem.cpu.engine import (
        DECODE_STREAMS_ENV,
        DEFAULT_DECODE_STREAMS,
        FEW_THREADS_DECODE_STREAMS,
        PREFETCH_MIN_THREADS,
    )

    monkeypatch.delenv(DECODE_STREAMS_ENV, raising=False)
    few = CPUEngine(threads=PREFETCH_MIN_THREADS - 1, variant=None, prefill="off", pin=False)
    many = CPUEngine(threads=PREFETCH_MIN_THREADS, variant=None, prefill="off", pin=False)
    assert (
        (few.decode_streams, many.decode_streams)
        == (FEW_THREADS_DECODE_STREAMS, DEFAULT_DECODE_STREAMS)
        == (4, 8)
    )
    monkeypatch.setenv(DECODE_STREAMS_ENV, "3")
    assert CPUEngine(threads=PREFETCH_MIN_THREADS, variant=None, prefill="off", pin=False).decode_streams == 3


@pytest.mark.parametrize("types", EXPERT_TYPES, ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_every_split_of_a_one_token_call_gives_the_same_experts_bit_for_bit(types, monkeypatch):
    """TANDEM_CPU_DECODE_LOOPS (gate/up and down in one parallel loop or two),
    TANDEM_CPU_DECODE_TASKS (about how many tasks a thread gets) and
    TANDEM_CPU_DECODE_TASK_KIB (the most weight bytes a task reads): each output row is one
    kernel's dot, summed over the slots in slot order, however the rows are split."""
    from tandem.cpu.engine import (
        DECODE_LOOPS_ENV,
        DECODE_TASK_KIB_ENV,
        DECODE_TASKS_ENV,
        DEFAULT_DECODE_TASK_KIB,
        DEFAULT_DECODE_TASKS,
        _native,
    )

    gate, up, down = expert_set(types, seed=17)
    x, ids, weights = routing(1, 4, seed=18)
    ids[0, 2] = E  # a dropped slot
    ids[0, 3] = ids[0, 0]  # one expert in two slots
    outs = []
    splits = [("1", "4", "256"), ("1", "1", "256"), ("1", "64", "256"), ("1", "1", "16"), ("2", "4", "256")]
    for threads in (1, 3, 5):  # 5: more threads than a small machine has cores (not pinned)
        for loops, tasks, kib in splits:
            monkeypatch.setenv(DECODE_LOOPS_ENV, loops)
            monkeypatch.setenv(DECODE_TASKS_ENV, tasks)
            monkeypatch.setenv(DECODE_TASK_KIB_ENV, kib)
            engine = CPUEngine(threads=threads, variant=None, prefill="off")
            assert _native().decode_split() == (loops == "1", int(tasks), int(kib) << 10)
            outs.append(engine.experts(gate, up, down)(x, ids, weights))
    # process-wide: back to the default
    _native().set_decode_split(True, DEFAULT_DECODE_TASKS, DEFAULT_DECODE_TASK_KIB << 10)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    assert rel(outs[0], experts_exact(engine.kernels, gate, up, down, x, ids, weights)) < 5e-4
    bad_values = [
        (DECODE_LOOPS_ENV, "3"),
        (DECODE_LOOPS_ENV, "one"),
        (DECODE_TASKS_ENV, "0"),
        (DECODE_TASK_KIB_ENV, "8"),
    ]
    for name, bad in bad_values:
        monkeypatch.setenv(name, bad)
        with pytest.raises(TandemError, match=name):
            CPUEngine(threads=2, variant=None, prefill="off")
        monkeypatch.delenv(name)


@pytest.mark.parametrize("level", ["0", "1", "2"])
def test_every_prefetch_level_gives_the_same_decode_result(level, monkeypatch):
    from tandem.cpu.engine import _native

    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=11)
    x, ids, weights = routing(1, 2, seed=12)
    monkeypatch.setenv(PREFETCH_ENV, "0")
    want = CPUEngine(threads=2, variant=None, prefill="off").experts(gate, up, down)(x, ids, weights)
    monkeypatch.setenv(PREFETCH_ENV, "2048")
    monkeypatch.setenv(PREFETCH_LEVEL_ENV, level)
    engine = CPUEngine(threads=2, variant=None, prefill="off")
    assert (_native().decode_prefetch(), _native().decode_prefetch_level()) == (2048, int(level))
    torch.testing.assert_close(engine.experts(gate, up, down)(x, ids, weights), want, rtol=0, atol=0)
    monkeypatch.setenv(PREFETCH_LEVEL_ENV, "3")
    with pytest.raises(TandemError, match=PREFETCH_LEVEL_ENV):
        CPUEngine(threads=2, variant=None, prefill="off")


def test_dropping_an_op_with_a_call_in_flight_waits_for_it():
    gate, up, down = expert_set((T.Q8_0, T.Q8_0), seed=7)
    x, ids, weights = routing(64, 4, seed=8)
    for _ in range(20):
        experts = engine(2).experts(gate, up, down)
        experts.submit(x, ids, weights)
        del experts  # the native op waits for the pool before its buffers go
    assert torch.isfinite(engine(2).experts(gate, up, down)(x, ids, weights)).all()


def test_rms_norm_keeps_the_shape_and_refuses_other_layouts():
    x = torch.randn(2, 3, 64)
    scale = torch.randn(64)
    out = engine(2).rms_norm(x, scale, 1e-5)
    assert out.shape == x.shape
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x, (64,), scale, 1e-5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous float32"):
        engine(2).rms_norm(x.transpose(0, 1), scale, 1e-5)
    with pytest.raises(ValueError, match="contiguous float32"):
        engine(2).rms_norm(x.double(), scale, 1e-5)


# Long caches with few kv heads are split over positions (chunks of at least 64, merged); a
# task takes the query heads of a kv head, or blocks of four or one where that leaves too few
# tasks (groups of 8, 7, 16, 2 and 1 here), with head sizes that are and are not multiples
# of 16 and 64.
@pytest.mark.parametrize("variant", _testable_variants())
@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize(
    "hq,hkv,t,d",
    [
        (32, 4, 300, 128),
        (32, 4, 130, 128),
        (8, 8, 1, 64),
        (14, 2, 37, 80),
        (16, 1, 1000, 64),
        (4, 2, 129, 32),
        (12, 3, 70, 40),
    ],
)
def test_decode_attention_matches_torch(hq, hkv, t, d, threads, variant):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(1, hq, 1, d, generator=g)
    cache = torch.randn(1, hkv, t + 7, d, generator=g)  # a cache with room left: a strided view
    k, v = cache[:, :, :t], torch.randn(1, hkv, t, d, generator=g) * 3
    out = variant_engine(variant, threads).attention_decode(q, k, v, d**-0.5)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), enable_gqa=True
    ).transpose(1, 2)  # [1, 1, hq, d]
    assert out.shape == exact.shape
    assert float((out.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


def test_decode_attention_declines_other_forms():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16)
    e = engine(2)
    assert (
        e.attention_decode(q.expand(2, 4, 1, 16), k.expand(2, 2, 5, 16), k.expand(2, 2, 5, 16), 1.0) is None
    )
    assert e.attention_decode(torch.randn(1, 4, 2, 16), k, k, 1.0) is None  # two query positions
    assert e.attention_decode(torch.randn(1, 3, 1, 16), k, k, 1.0) is None  # heads not a multiple
    assert e.attention_decode(q.double(), k.double(), k.double(), 1.0) is None


def test_prefetch_distance_leaves_results_alone_and_follows_the_environment(monkeypatch):
    from tandem import _cpu

    gate, up, down = expert_set((T.Q4_K, T.Q6_K), seed=21)
    x, ids, weights = routing(1, 4, seed=22)  # one token: the decode kernels, which prefetch
    before = _cpu.decode_prefetch()
    try:
        _check_prefetch(monkeypatch, gate, up, down, x, ids, weights)
    finally:
        _cpu.set_decode_prefetch(before)


def _check_prefetch(monkeypatch, gate, up, down, x, ids, weights):
    from tandem import _cpu

    monkeypatch.setenv("TANDEM_CPU_PREFETCH", "0")
    off = CPUEngine(threads=2).experts(gate, up, down)(x, ids, weights)
    assert _cpu.decode_prefetch() == 0
    monkeypatch.setenv("TANDEM_CPU_PREFETCH", "4096")
    on = CPUEngine(threads=2).experts(gate, up, down)(x, ids, weights)
    assert _cpu.decode_prefetch() == 4096
    assert torch.equal(on, off)
    monkeypatch.delenv("TANDEM_CPU_PREFETCH")
    assert CPUEngine(threads=2).prefetch == 0  # off below 8 threads
    assert CPUEngine(threads=8, pin=False).prefetch == 2048
    monkeypatch.setenv("TANDEM_CPU_PREFETCH", "-1")
    with pytest.raises(TandemError, match="TANDEM_CPU_PREFETCH"):
        CPUEngine(threads=1)


def test_expert_calls_time_their_phases_when_asked():
    import time

    from tandem.cpu.engine import _native

    gate, up, down = expert_set((T.Q4_K, T.Q6_K), seed=31)
    experts = engine(2).experts(gate, up, down)
    x, ids, weights = routing(24, 4, seed=32)
    op = experts._op
    experts(x, ids, weights)
    assert op.profiled_calls == 0 and sum(op.phase_seconds().values()) == 0
    op.set_profiling(True)
    t0 = time.perf_counter()
    experts(x, ids, weights)
    wall = time.perf_counter() - t0
    phases = op.phase_seconds()
    assert op.profiled_calls == 1
    assert set(phases) == {"group", "activations", "gate_up", "hidden_activations", "down", "weighted_sum"}
    assert phases["gate_up"] > 0 and phases["down"] > 0
    assert sum(phases.values()) <= wall
    # One token (the decode path): no grouping. In one loop (the default) gate/up, h and
    # down are one phase, timed as down; in two loops gate/up and down apart, the weighted
    # sum inside the down loop.
    for loops, calls in ((1, 2), (2, 3)):
        _native().set_decode_split(loops == 1)
        before = op.phase_seconds()
        t0 = time.perf_counter()
        experts(x[:1], ids[:1], weights[:1])
        wall = time.perf_counter() - t0
        one = {name: seconds - before[name] for name, seconds in op.phase_seconds().items()}
        assert op.profiled_calls == calls
        assert one["activations"] > 0 and one["down"] > 0
        assert (one["gate_up"] > 0) == (loops == 2)
        assert one["group"] == 0 and one["weighted_sum"] == 0
        assert sum(one.values()) <= wall
    _native().set_decode_split(True)
    op.set_profiling(False)
    experts(x, ids, weights)
    assert op.profiled_calls == 0


@pytest.mark.parametrize("variant", _testable_variants())
@pytest.mark.parametrize(("heads", "rows", "k"), [(16, 512, 128), (16, 128, 512), (3, 5, 7), (128, 512, 128)])
def test_head_matvec_matches_torch(variant, heads, rows, k):
    g = torch.Generator().manual_seed(rows + k)
    a, x = torch.randn(heads, rows, k, generator=g), torch.randn(heads, k, generator=g)
    got = variant_engine(variant, 2).head_matvec(a, x)
    exact = torch.einsum("hrk,hk->hr", a.double(), x.double())
    assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-6  # float32 sums in another order


def test_head_matvec_reads_heads_apart_and_refuses_other_layouts():
    g = torch.Generator().manual_seed(0)
    kv_b = torch.randn(4, 96, 32, generator=g)  # MLA's kv_b_proj per head: 64 nope rows, then 32 value rows
    w_uv, x = kv_b[:, 64:], torch.randn(4, 32, generator=g)
    torch.testing.assert_close(engine(2).head_matvec(w_uv, x), torch.einsum("hrk,hk->hr", w_uv, x))
    with pytest.raises(ValueError, match="head_matvec"):
        engine(2).head_matvec(kv_b[:, :64].transpose(1, 2), torch.randn(4, 64))  # columns, not rows
    with pytest.raises(ValueError, match="head_matvec"):
        engine(2).head_matvec(w_uv, torch.randn(4, 31))
