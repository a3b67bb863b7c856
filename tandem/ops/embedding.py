"""Token embedding from GGUF blocks: the table dequantized at load, or only the rows looked up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from tandem.cpu.engine import dequantize_rows
from tandem.cpu.engine import enabled as engine_enabled
from tandem.errors import RuleError
from tandem.ops.base import TandemModule
from tandem.ops.linear import DEQUANT_MODES, parse_dtype
from tandem.weights.source import GGUFWeights


class QuantEmbedding(TandemModule):
    """Embedding lookup; keeps a scaled embedding's `embed_scale` (Gemma multiplies by sqrt(hidden)).

    dequant="call" (default) dequantizes only the looked-up rows: a prompt touches a few
    rows of a table that is often the largest tensor of a small model.
    """

    def __init__(
        self,
        key: str,
        orig: nn.Module,
        config: PretrainedConfig,
        *,
        dequant: str = "call",
        dtype: str = "float32",
        **base,
    ):
        super().__init__(key, orig, config, **base)
        if not isinstance(orig, nn.Embedding):
            raise RuleError(f"{key}: QuantEmbedding replaces nn.Embedding modules, not {type(orig).__name__}")
        if dequant not in DEQUANT_MODES:
            raise RuleError(f"{key}: dequant must be one of {', '.join(DEQUANT_MODES)}, got {dequant!r}")
        self.num_embeddings = orig.num_embeddings
        self.embedding_dim = orig.embedding_dim
        self.dequant = dequant
        self.dtype = parse_dtype(dtype, key)
        scale = getattr(orig, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.device.type != "meta":
            self.register_buffer("embed_scale", scale.clone().to(self.generate_device), persistent=False)
        else:
            self.embed_scale = None
        self.qweight = None
        self.weight: nn.Parameter | None = None

    def load(self, weights: GGUFWeights) -> None:
        shape = (self.num_embeddings, self.embedding_dim)
        if self.dequant == "load":
            dense = weights.dense(f"{self.key}.weight", shape, self.dtype, self.generate_device)
            self.weight = nn.Parameter(dense, requires_grad=False)
        else:
            self.qweight = weights.quant(f"{self.key}.weight", shape)
            # Values must match Hugging Face conventions; architectures with value fixes need "load".
            probe = weights.arch.fix_dense(f"{self.key}.weight", torch.zeros(1), weights.config)
            if not torch.equal(probe, torch.zeros(1)):
                raise RuleError(f"{self.key}: this architecture needs dequant: load for its embedding")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., hidden]
        ids = input_ids.to(self.generate_device)
        if self.weight is not None:
            out = F.embedding(ids, self.weight)
        else:
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
                raise IndexError(f"token id outside [0, {self.num_embeddings})")
            flat = ids.reshape(-1).cpu()
            # The engine's dequantization when it has one (a decode step looks up one row: the
            # torch reference's block arithmetic is a dozen small ops); the reference otherwise.
            dense = (
                dequantize_rows(self.qweight, flat)
                if self.dtype == torch.float32 and engine_enabled()
                else None
            )
            if dense is None:
                dense = self.qweight.select_rows(flat).dequantize(self.dtype)
            out = dense.to(self.generate_device).view(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            # Hugging Face casts the scale to the table's dtype first (it matters for bf16).
            out = out * self.embed_scale.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.num_embeddings}x{self.embedding_dim}, dequant={self.dequant}"
