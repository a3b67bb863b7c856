"""How a long prompt's routed experts divide between the GPU and the CPU engine.

For a prompt of many tokens a hybrid layer can copy experts' blocks to the GPU and
compute them there (tandem.gpu.moe_batched), which costs about the same per expert
whatever the token count (the bus's time), or leave them to the CPU engine, which costs
about the same per routed slot (token × expert). Both run at once: the GPU takes the
experts below a cut and the engine the rest, the cut chosen so that both finish
together. The two costs are measured on the calls themselves (a moving average over
the layers of one engine), starting from a guess: the engine at 5 µs per slot on 16
threads, the bus at 40 GB/s.

$TANDEM_GPU_PREFILL_SPLIT=0 leaves every expert of such a call to the GPU.
"""

from __future__ import annotations

import weakref

from tandem.env_switches import switch

SPLIT_ENV = "TANDEM_GPU_PREFILL_SPLIT"
GUESS_SLOT_S_16_THREADS = 5e-6
GUESS_BUS_BYTES_S = 40e9
SMOOTHING = 0.5  # weight of the newest measurement


def split_enabled() -> bool:
    return switch(SPLIT_ENV, default=True)


class PrefillSplit:
    """The running cost model of one engine's layers; `cut` chooses, `measured` learns."""

    def __init__(self, threads: int, expert_bytes: int):
        self.slot_s = GUESS_SLOT_S_16_THREADS * 16 / max(1, threads)  # CPU seconds per routed slot
        self.expert_s = expert_bytes / GUESS_BUS_BYTES_S  # GPU seconds per expert with work

    def cut(self, tokens_of: list[int]) -> int:
        """The first expert left to the CPU: experts [0, cut) go to the GPU. len(tokens_of):
        every expert on the GPU; 0: all on the CPU."""
        cpu_slots = sum(tokens_of)
        gpu_experts = 0
        best, best_cost = 0, cpu_slots * self.slot_s
        for e, count in enumerate(tokens_of):
            if count:
                gpu_experts += 1
                cpu_slots -= count
            cost = max(gpu_experts * self.expert_s, cpu_slots * self.slot_s)
            if cost < best_cost:
                best, best_cost = e + 1, cost
        return best

    def engine_timed(self, slots: int, elapsed_s: float, waited: bool) -> None:
        """The engine's share, `slots` routed slots, was submitted elapsed_s before its result
        was taken. When taking it waited (`waited`), that is its time; otherwise it had
        finished while the GPU's share was being queued, and elapsed_s only bounds its time
        from above: learnt only where it lowers the estimate (learning the bound taught one
        layer 8.7 ms a slot on the H200)."""
        if slots > 0 and (waited or elapsed_s / slots < self.slot_s):
            self.measured(slots, elapsed_s, 0, 0.0)

    def measured(self, cpu_slots: int, cpu_s: float, gpu_experts: int, gpu_s: float) -> None:
        if cpu_slots > 0 and cpu_s > 0:
            self.slot_s += SMOOTHING * (cpu_s / cpu_slots - self.slot_s)
        if gpu_experts > 0 and gpu_s > 0:
            self.expert_s += SMOOTHING * (gpu_s / gpu_experts - self.expert_s)


_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its cost model


def learned(engine) -> PrefillSplit | None:
    """The engine's cost model, if a prompt used it."""
    return _models.get(engine)


def split_of(engine, expert_bytes: int) -> PrefillSplit:
    """The cost model shared by the layers on `engine` (made on first use)."""
    if engine not in _models:
        _models[engine] = PrefillSplit(engine.threads, expert_bytes)
    return _models[engine]
