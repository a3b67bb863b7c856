"""Token embedding from GGUF blocks: the table dequantized at load, or only the rows looked up."""

from __future__ import annotations

from dataclasses import replace

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
    rows of a table that is often the largest tensor of a small model. The table's blocks
    stay in CPU RAM unless table_device names a CUDA device (the generate device): there a
    Triton kernel looks the rows up from ids on the GPU, with nothing read on the host, so
    a captured decode step can take the lookup in (tandem.engine.graph_decode).
    """

    def __init__(
        self,
        key: str,
        orig: nn.Module,
        config: PretrainedConfig,
        *,
        dequant: str = "call",
        dtype: str = "float32",
        table_device: str = "cpu",
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
        try:
            self.table_device = torch.device(table_device)
        except (RuntimeError, TypeError):
            raise RuleError(f"{key}: table_device {table_device!r} is not a device") from None
        if self.table_device.type != "cpu" and (
            self.table_device != self.generate_device or self.table_device.type != "cuda" or dequant != "call"
        ):
            raise RuleError(
                f"{key}: table_device is the CPU or, with dequant: call, the CUDA generate device "
                f"({self.generate_device}), not {table_device!r}"
            )
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
            if self.table_device.type == "cuda":
                from tandem.ops.linear_gpu import triton_kernels

                if not triton_kernels().supports(self.qweight.ggml_type, self.embedding_dim):
                    raise RuleError(
                        f"{self.key}: no GPU lookup for a {self.qweight.ggml_type.name} table; "
                        "keep table_device: cpu or use dequant: load"
                    )
                self.qweight = replace(self.qweight, data=self.qweight.data.to(self.table_device))

    @property
    def ids_device(self) -> torch.device | None:
        """Where token ids are best given: the dense weight's device or a GPU table's; None
        for a table in CPU RAM, whose lookup reads the ids on the host (a graph cannot hold it)."""
        if self.weight is not None:
            return self.weight.device
        return self.table_device if self.table_device.type == "cuda" else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., hidden]
        shape = (*input_ids.shape, self.embedding_dim)
        if self.weight is not None:
            out = F.embedding(input_ids.to(self.weight.device), self.weight)
        elif self.table_device.type == "cuda":
            # An id outside the table gives zeros here: checking it would read it on the host.
            from tandem.ops.linear_gpu import triton_kernels

            q = self.qweight
            ids = input_ids.reshape(-1).to(self.table_device)
            rows = triton_kernels().gather_rows(
                q.data, q.ggml_type, self.num_embeddings, self.embedding_dim, ids
            )
            out = rows.to(self.dtype).view(shape)
        else:
            flat = input_ids.reshape(-1).cpu()
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
                raise IndexError(f"token id outside [0, {self.num_embeddings})")
            # The engine's dequantization when it has one (a decode step looks up one row: the
            # torch reference's block arithmetic is a dozen small ops); the reference otherwise.
            dense = (
                dequantize_rows(self.qweight, flat)
                if self.dtype == torch.float32 and engine_enabled()
                else None
            )
            if dense is None:
                dense = self.qweight.select_rows(flat).dequantize(self.dtype)
            out = dense.to(self.generate_device).view(shape)
        if self.embed_scale is not None:
            # Hugging Face casts the scale to the table's dtype first (it matters for bf16).
            out = out * self.embed_scale.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        table = f", table={self.table_device}" if self.table_device.type != "cpu" else ""
        return f"{super().extra_repr()}, {self.num_embeddings}x{self.embedding_dim}, dequant={self.dequant}{table}"
