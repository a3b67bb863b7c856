"""torch's threads beside the engine's: one torch thread for single-token steps."""

from __future__ import annotations

import torch


class DecodeThreads:
    """A forward pre-hook giving torch one thread for single-token steps.

    torch's OpenMP workers spin for a while after each parallel op; at decode the
    engine's pool then shares the cores with spinning threads and every engine
    loop waits for a descheduled worker (measured: 101 ms per token against 39 ms
    on two cores). A decode step's torch work (norms, RoPE, one query's attention)
    is too small to split anyway, so torch runs it on one thread; prefill gets
    torch's thread count back for its attention.
    """

    def __init__(self) -> None:
        self.threads = torch.get_num_threads()

    def __call__(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = (
            ids.shape[-1] if isinstance(ids, torch.Tensor) else embeds.shape[-2] if embeds is not None else 2
        )
        if tokens == 1:
            if torch.get_num_threads() != 1:
                self.threads = torch.get_num_threads()
                torch.set_num_threads(1)
        elif torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


def install_decode_threads(model: torch.nn.Module) -> None:
    """Attach DecodeThreads to a model whose CPU operators use the engine."""
    model.register_forward_pre_hook(DecodeThreads(), with_kwargs=True)
