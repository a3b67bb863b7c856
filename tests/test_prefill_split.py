"""The cut between a long prompt's experts on the GPU and on the CPU engine."""

from __future__ import annotations

import pytest

from tandem.gpu.prefill_split import PrefillSplit, split_enabled


def model(slot_s: float, expert_s: float) -> PrefillSplit:
    split = PrefillSplit(threads=16, expert_bytes=1)
    split.slot_s, split.expert_s = slot_s, expert_s
    return split


def test_the_cut_balances_the_two_sides():
    # 8 experts of 10 slots: an expert costs the GPU 3 slots' CPU time, so the GPU takes
    # 6 (18 units) and the CPU the last 2 (20 units).
    assert model(1.0, 3.0).cut([10] * 8) == 6


def test_a_slow_bus_leaves_everything_to_the_cpu_and_a_slow_cpu_everything_to_the_gpu():
    assert model(1.0, 1000.0).cut([4] * 8) == 0
    assert model(1000.0, 1.0).cut([4] * 8) == 8


def test_experts_without_tokens_cost_nothing():
    # Only experts 0 and 7 have work: the cut gives one to each side.
    assert model(1.0, 5.0).cut([5, 0, 0, 0, 0, 0, 0, 5]) in range(1, 8)


def test_measurements_move_the_costs_halfway():
    split = model(1.0, 1.0)
    split.measured(cpu_slots=10, cpu_s=30.0, gpu_experts=2, gpu_s=10.0)
    assert split.slot_s == pytest.approx(2.0) and split.expert_s == pytest.approx(3.0)
    split.measured(cpu_slots=0, cpu_s=0.0, gpu_experts=0, gpu_s=0.0)  # nothing ran: unchanged
    assert split.slot_s == pytest.approx(2.0) and split.expert_s == pytest.approx(3.0)


def test_an_engine_share_taken_without_a_wait_only_bounds_its_time():
    split = model(1.0, 1.0)
    split.engine_timed(slots=2, elapsed_s=40.0, waited=False)  # done while the GPU's work was queued
    assert split.slot_s == pytest.approx(1.0)
    split.engine_timed(slots=10, elapsed_s=5.0, waited=False)  # a bound below the estimate: learnt
    assert split.slot_s == pytest.approx(0.75)
    split.engine_timed(slots=10, elapsed_s=40.0, waited=True)  # waited for: its time
    assert split.slot_s == pytest.approx(2.375)


def test_the_split_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TANDEM_GPU_PREFILL_SPLIT", "0")
    assert not split_enabled()
    monkeypatch.delenv("TANDEM_GPU_PREFILL_SPLIT")
    assert split_enabled()


def test_layers_learn_which_one_follows_them():
    from tandem.ops.experts_cpu import ExpertsCPU

    a, b, c = (object.__new__(ExpertsCPU) for _ in range(3))
    assert [layer._learn_order() for layer in (a, b, c)] == [None, None, None]  # the first pass learns
    assert a._learn_order() is b  # ... and the next one knows: after c came a, after a came b
    assert b._learn_order() is c
    assert c._learn_order() is a


def test_each_engine_has_one_cost_model_that_bench_can_read():
    from tandem.gpu.prefill_split import learned, split_of

    class Engine:
        threads = 8

    engine, other = Engine(), Engine()
    assert learned(engine) is None
    split = split_of(engine, expert_bytes=4_000_000)
    assert split_of(engine, expert_bytes=1) is split and learned(engine) is split
    assert split.slot_s == pytest.approx(10e-6) and split.expert_s == pytest.approx(
        1e-4
    )  # 8 threads, 40 GB/s
    assert learned(other) is None
