"""The base of every operator that rules inject."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from tandem.weights.source import GGUFWeights


class TandemModule(nn.Module):
    """An operator built from the Hugging Face module it replaces, loading its own weights.

    key: the module's path in the model (e.g. "model.layers.3.mlp.down_proj"); weights
        are looked up as f"{key}.weight" etc. in Hugging Face naming.
    orig: the replaced module (on the meta device); read its hyper-parameters, don't keep it
        unless the operator wraps it.
    generate_device / prefill_device: where the operator runs for decode and for prefill.
    generate_op / prefill_op: names of alternative implementations, for operators that have several.
    Subclasses take their own extra keyword arguments; the rule engine rejects unknown ones.
    """

    def __init__(
        self,
        key: str,
        orig: nn.Module,
        config: PretrainedConfig,
        *,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        generate_op: str | None = None,
        prefill_op: str | None = None,
    ):
        super().__init__()
        self.key = key
        self.generate_device = torch.device(generate_device)
        self.prefill_device = torch.device(prefill_device or generate_device)
        self.generate_op = generate_op
        self.prefill_op = prefill_op

    def load(self, weights: GGUFWeights) -> None:
        """Load this operator's weights; called once after injection."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"key={self.key!r}, device={self.generate_device}"
