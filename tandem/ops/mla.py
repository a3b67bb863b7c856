"""DeepSeek Multi-head Latent Attention (MLA), replacing DeepseekV2Attention / DeepseekV3Attention.

Two forms of the same attention, chosen per call by `prefill_op` (more than one query
token) and `generate_op` (one token):

- "plain": decompress the cached latent into per-head keys and values with kv_b_proj
  (W_UK, W_UV) and attend as transformers does;
- "absorbed": fold W_UK into the query and W_UV into the output, so attention runs
  directly on the latent: scores = (q_nope W_UK) c^T + q_rope k_rope^T, out = (p c) W_UV.
  Per token it reads kv_lora_rank + qk_rope_head_dim numbers instead of
  heads * (qk_head_dim + v_head_dim): the decode form.

On the CPU with the engine on, a decode step's projections other than kv_b_proj run on
the engine's linear op over the file's blocks (ENGINE_PROJECTIONS) instead of torch,
which multiplies float32 copies on one thread at decode (on the 2-core machine that was
most of a DeepSeek-V2-Lite layer's step), and the absorbed form's two per-head products
with kv_b_proj run on the engine's pool (`head_matvec`, float32). Prompts keep torch's
float32 products, which use every thread.

On a GPU, a one-token step of the absorbed form runs the fused kernels of
tandem.gpu.mla_kernels (the latent's norm, the rotary embeddings and the cache rows in
one launch; the scores, softmax and value product as a split-key attention) around
torch's projections and per-head products.

Cache: both forms keep exactly what transformers' DeepSeek attention keeps (5.17 and 5.24):
the normalised latent c [B, 1, S, kv_lora_rank] in the cache layer's key slot and the
rotated shared rope key [B, 1, S, qk_rope_head_dim] in its value slot, through the
ordinary `Cache.update`. So forms can alternate between calls (plain prefill, absorbed
decode), and `model.generate` or a DynamicCache loop work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from tandem.cpu.engine import default_engine
from tandem.cpu.engine import enabled as engine_enabled
from tandem.errors import RuleError
from tandem.ops.attention_cpu import engine_prompt_attention
from tandem.ops.base import TandemModule
from tandem.ops.linear import parse_dtype
from tandem.ops.mla_math import apply_rope, attend, mask_bias, softmax_scale
from tandem.weights.source import GGUFWeights

FORMS = ("plain", "absorbed")
# Projections that run on the CPU engine at one token (8-bit activations, the file's
# blocks, every thread) when MLA runs on the CPU with the engine on; kv_b_proj stays a
# float32 matrix, which the absorbed form takes apart per head.
ENGINE_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")


class MLAttention(TandemModule):
    """MLA with or without q-LoRA; weights taken by Hugging Face name under `key`.

    generate_op / prefill_op: "plain" (default for both) or "absorbed"; the usual pairing
        for decode-heavy use is prefill_op: plain, generate_op: absorbed.
    dtype: float32 (default), bfloat16 or float16 for weights and arithmetic. float32 on
        a GPU too: on the tiny DeepSeek models of the tests, bf16 MLA alone moves the
        logits by 2.3% (the other GPU parts by under 2% together).
    Weights, arithmetic and the cache live on generate_device; prefill_device is not used,
    since the cache a prefill writes is what decode reads.
    """

    # Set by tandem.ops.decode_layer_gpu on the layers it fuses: one-token steps on a GPU
    # then take the fused kernels ($TANDEM_GPU_FUSED_DECODE=0 leaves it off).
    fused_gpu_step = False

    def __init__(
        self, key: str, orig: nn.Module, config: PretrainedConfig, *, dtype: str = "float32", **base
    ):
        # Prefill defaults to plain whatever decode uses: with many queries, decompressing
        # K and V once costs fewer FLOPs than running every head at kv_lora_rank width.
        base["generate_op"] = base.get("generate_op") or "plain"
        base["prefill_op"] = base.get("prefill_op") or "plain"
        super().__init__(key, orig, config, **base)
        for name, form in (("generate_op", self.generate_op), ("prefill_op", self.prefill_op)):
            if form not in FORMS:
                raise RuleError(f"{key}: {name} must be one of {', '.join(FORMS)}, got {form!r}")
        if getattr(orig, "kv_b_proj", None) is None or getattr(orig, "kv_lora_rank", None) is None:
            raise RuleError(f"{key}: MLAttention replaces DeepSeek MLA attention, not {type(orig).__name__}")
        self.dtype = parse_dtype(dtype, key)
        self.layer_idx = orig.layer_idx
        self.hidden_size = orig.hidden_size
        self.num_heads = orig.num_heads
        self.q_lora_rank = orig.q_lora_rank
        self.kv_lora_rank = orig.kv_lora_rank
        self.nope_dim = orig.qk_nope_head_dim
        self.rope_dim = orig.qk_rope_head_dim
        self.v_dim = orig.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        # V3 hands (cos, sin) and may interleave; V2 hands complex freqs (always interleaved pairs).
        self.rope_interleave = bool(getattr(config, "rope_interleave", False))
        self.scaling = softmax_scale(config, self.qk_dim)
        self.q_norm_eps = float(orig.q_a_layernorm.variance_epsilon) if self.q_lora_rank else 0.0
        self.kv_norm_eps = float(orig.kv_a_layernorm.variance_epsilon)
        self.has_bias = {
            n: getattr(getattr(orig, n, None), "bias", None) is not None
            for n in ("q_a_proj", "q_proj", "kv_a_proj_with_mqa", "o_proj")
        }
        self.is_causal = True
        # On the CPU engine (set at load): a decode step's projections and W_UK per head, transposed.
        self._engine_linears: dict[str, list] = {}
        self._w_uk_t: torch.Tensor | None = None

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        h, hd = self.num_heads, self.hidden_size
        shapes = {}
        if self.q_lora_rank:
            shapes |= {
                "q_a_proj": (self.q_lora_rank, hd),
                "q_a_layernorm": (self.q_lora_rank,),
                "q_b_proj": (h * self.qk_dim, self.q_lora_rank),
            }
        else:
            shapes["q_proj"] = (h * self.qk_dim, hd)
        return shapes | {
            "kv_a_proj_with_mqa": (self.kv_lora_rank + self.rope_dim, hd),
            "kv_a_layernorm": (self.kv_lora_rank,),
            "kv_b_proj": (h * (self.nope_dim + self.v_dim), self.kv_lora_rank),
            "o_proj": (hd, h * self.v_dim),
        }

    def load(self, weights: GGUFWeights) -> None:
        device = self.generate_device
        # A long prompt's attention on the engine's pool (decided at load, as the engine's operators are).
        self._engine_attention = device.type == "cpu" and engine_enabled()
        for name, shape in self._shapes().items():
            # Norm weights stay float32: they scale a float32-normalised vector.
            dtype = torch.float32 if name.endswith("layernorm") else self.dtype
            w = weights.dense(f"{self.key}.{name}.weight", shape, dtype, device)
            self.register_buffer(f"{name}_weight", w)
            if self.has_bias.get(name):
                b = weights.dense(f"{self.key}.{name}.bias", (shape[0],), self.dtype, device)
                self.register_buffer(f"{name}_bias", b)
            if self._engine_attention and self.dtype == torch.float32 and name in ENGINE_PROJECTIONS:
                self._take_engine(weights, name, shape)
        # W_UK transposed per head [H, r, nope], for the engine's per-head products at decode.
        if self._engine_attention and self.dtype == torch.float32:
            self._w_uk_t = self._kv_b_heads()[0].transpose(1, 2).contiguous()

    def _take_engine(self, weights, name: str, shape: tuple[int, ...]) -> None:
        """The projection `name` at one token as the engine's linear op(s) over the file's
        blocks, where the engine has kernels for them."""
        if not isinstance(weights, GGUFWeights):
            return
        engine = default_engine()
        parts = weights.quant_parts(f"{self.key}.{name}.weight", shape)
        if all(engine.supports(p.ggml_type) for p in parts):
            self._engine_linears[name] = [engine.linear(p) for p in parts]

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        ops = self._engine_linears.get(name)
        if ops is None or x.numel() != x.shape[-1]:  # a prompt: torch's product on every thread
            return F.linear(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias", None))
        outs = [op(x) for op in ops]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        bias = getattr(self, f"{name}_bias", None)
        return y if bias is None else y + bias

    def _rms(self, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (getattr(self, f"{name}_weight") * h.to(x.dtype)).to(x.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Same call as transformers' DeepSeek attention (keywords; `cache` in 5.24,
        `past_key_values` in 5.17). Returns (output [B, T, hidden], None): no attention weights."""
        if position_embeddings is None:
            raise ValueError(f"{self.key}: MLA needs the model's position_embeddings")
        cache = cache if cache is not None else past_key_values
        device = self.generate_device
        x = hidden_states.to(device=device, dtype=self.dtype)
        bsz, q_len = x.shape[:2]

        q, kv = self._project(x)
        layer = self._gpu_step_layer(cache, x, attention_mask, position_embeddings)
        if layer is not None:  # one token on a GPU: the fused kernels (tandem.gpu.mla_kernels)
            out = self._gpu_step(q, kv, position_embeddings, layer)
            return out.to(device=hidden_states.device, dtype=hidden_states.dtype), None
        q = q.view(bsz, q_len, self.num_heads, self.qk_dim).transpose(1, 2)  # [B, H, T, qk]
        q_nope, q_rope = torch.split(q, [self.nope_dim, self.rope_dim], dim=-1)

        latent, k_rope = torch.split(kv, [self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self._rms("kv_a_layernorm", latent, self.kv_norm_eps).view(bsz, 1, q_len, self.kv_lora_rank)
        k_rope = k_rope.reshape(bsz, 1, q_len, self.rope_dim)
        q_rope, k_rope = apply_rope(q_rope, k_rope, position_embeddings, self.rope_interleave)
        q_rope, k_rope = q_rope.to(self.dtype), k_rope.to(self.dtype)  # float32 cos/sin promote them

        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx, kwargs=kwargs)  # [B, 1, S, *]
        bias = mask_bias(attention_mask, q_len, latent.shape[2], device)

        form = self.prefill_op if q_len > 1 else self.generate_op
        if form == "absorbed":
            out = self._absorbed(q_nope, q_rope, latent, k_rope, bias)
        else:
            out = self._plain(q_nope, q_rope, latent, k_rope, bias, attention_mask)
        out = self._linear("o_proj", out.reshape(bsz, q_len, self.num_heads * self.v_dim))
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype), None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> the queries [B, T, H · qk] and kv_a's output [B, T, r + rope]."""
        if self.q_lora_rank:
            q = self._linear(
                "q_b_proj", self._rms("q_a_layernorm", self._linear("q_a_proj", x), self.q_norm_eps)
            )
        else:
            q = self._linear("q_proj", x)
        return q, self._linear("kv_a_proj_with_mqa", x)

    def _gpu_step_layer(self, cache, x: torch.Tensor, mask, rotary):
        """The cache layer a one-token step on a GPU writes through the fused kernels, or None
        where the torch path runs (prompts, batches, masks other than the causal one, other
        caches, sizes the kernels do not take, or a layer left unfused: `fused_gpu_step`)."""
        from tandem.engine.kv_cache import GrowingLayer

        if (
            x.device.type != "cuda"
            or x.shape[:2] != (1, 1)
            or self.generate_op != "absorbed"
            or self.dtype != torch.float32
            or any(n & (n - 1) for n in (self.kv_lora_rank, self.rope_dim))
            or not (isinstance(rotary, tuple) or (isinstance(rotary, torch.Tensor) and rotary.is_complex()))
        ):
            return None
        layers = getattr(cache, "layers", None)
        if not self.fused_gpu_step or not layers or len(layers) <= self.layer_idx:
            return None
        layer = layers[self.layer_idx]
        if type(layer) is not GrowingLayer or layer._k is None or layer._k.device != x.device:
            return None
        return layer if layer.sees_every_row(mask) else None

    def _gpu_step(self, q: torch.Tensor, kv: torch.Tensor, rotary, layer) -> torch.Tensor:
        """One token's absorbed attention and o_proj with the fused kernels -> [1, 1, hidden]."""
        from tandem.gpu.mla_kernels import (
            ROPE_HALF,
            ROPE_V2_COMPLEX,
            ROPE_V3_INTERLEAVED,
            mla_decode_attention,
            mla_rope_append,
        )

        h = self.num_heads
        mode = ROPE_V2_COMPLEX if isinstance(rotary, torch.Tensor) else ROPE_HALF
        if mode == ROPE_HALF and self.rope_interleave:
            mode = ROPE_V3_INTERLEAVED
        position, eager = layer.step_position(q.device)
        q_flat = q.reshape(-1)
        q_rope = mla_rope_append(
            q_flat, kv.reshape(-1), self.kv_a_layernorm_weight, self.kv_norm_eps, rotary, mode, position,
            layer._k, layer._v, h,
        )  # fmt: skip
        if eager:
            layer.advance()
        w_uk, w_uv = self._kv_b_heads()
        q_nope = q_flat.view(h, self.qk_dim)[:, : self.nope_dim]
        q_lat = torch.einsum("hd,hdr->hr", q_nope, w_uk)  # [H, r]
        out_lat = mla_decode_attention(q_lat, q_rope, layer._k, layer._v, position, self.scaling)
        out = torch.einsum("hr,hvr->hv", out_lat, w_uv)  # [H, v]
        return self._linear("o_proj", out.reshape(1, 1, h * self.v_dim))

    def _plain(self, q_nope, q_rope, latent, k_rope, bias, mask=None) -> torch.Tensor:
        """Per-head keys and values from the latent. Returns [B, T, H, v]."""
        bsz, _, seq, _ = latent.shape
        kv = F.linear(latent, self.kv_b_proj_weight)  # [B, 1, S, H*(nope+v)]
        kv = kv.view(bsz, seq, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope_dim, self.v_dim], dim=-1)  # [B, H, S, *]
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)  # [B, H, S, qk]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, H, T, qk]
        if getattr(self, "_engine_attention", False) and q.shape[0] == 1:
            sliced = None if mask is None else mask[..., -q.shape[2] :, :seq]
            out = engine_prompt_attention(q, k, v, sliced, self.scaling)  # (no [H, T, S] scores)
            if out is not None:
                return out
        p = attend(torch.matmul(q, k.transpose(2, 3)) * self.scaling, bias)  # [B, H, T, S]
        return torch.matmul(p, v).transpose(1, 2)

    def _kv_b_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of kv_b_proj: W_UK [H, nope, r] and W_UV [H, v, r]; no copy of the weight."""
        kv_b = self.kv_b_proj_weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return kv_b[:, : self.nope_dim], kv_b[:, self.nope_dim :]

    def _absorbed(self, q_nope, q_rope, latent, k_rope, bias) -> torch.Tensor:
        """Attention on the latent: W_UK folded into q, W_UV applied after. Returns [B, T, H, v]."""
        w_uk, w_uv = self._kv_b_heads()
        h, r = self.num_heads, self.kv_lora_rank
        if self._w_uk_t is not None and q_nope.shape[0] == 1 and q_nope.shape[2] == 1:
            # One token on the CPU: the two per-head products on the engine's pool (torch has
            # one thread at decode), the small score and value products over the cache in torch.
            engine = default_engine()
            q_lat = engine.head_matvec(self._w_uk_t, q_nope.reshape(h, self.nope_dim).contiguous())
            scores = torch.matmul(q_lat.view(1, h, 1, r), latent.transpose(2, 3))
            scores = scores + torch.matmul(q_rope, k_rope.transpose(2, 3))
            p = attend(scores * self.scaling, bias)  # [1, H, 1, S]
            out_lat = torch.matmul(p, latent).reshape(h, r)
            return engine.head_matvec(w_uv, out_lat.contiguous()).view(1, 1, h, self.v_dim)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # [B, H, T, r]
        scores = torch.matmul(q_lat, latent.transpose(2, 3)) + torch.matmul(q_rope, k_rope.transpose(2, 3))
        p = attend(scores * self.scaling, bias)  # [B, H, T, S]
        out_lat = torch.matmul(p, latent)  # [B, H, T, r]
        return torch.einsum("bhtr,hvr->bthv", out_lat, w_uv)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, heads={self.num_heads}, q_lora={self.q_lora_rank}, "
            f"kv_lora={self.kv_lora_rank}, prefill={self.prefill_op}, generate={self.generate_op}"
        )
