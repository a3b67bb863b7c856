"""A decode step's decoder layers as one native call each, on tandem's CPU engine.

After loading, every decoder layer whose parts all run on the engine (its norms,
its linear layers, and its router and routed experts or gated MLP) gets a fused
forward: for one new token of one sequence with a growable KV cache
(tandem.engine.kv_cache) and no attention mask, the whole layer runs in the
engine (engine/decode_layer.h), weights and all read through the same engine ops
the layer's modules use. Anything else (prompts, batches, masks, other caches)
takes the layer's own modules, so results never depend on which path ran beyond
the last bits of float32 sums. Families: the Llama/Qwen2/Qwen3/Mixtral/Qwen2-MoE/
Qwen3-MoE layer (pre-norm, optional q/k norms and biases) and Gemma 3's
(four norms, GELU, sliding-window layers). A sliding-window layer accepts the mask
Hugging Face builds for it once the context outgrows the window, after checking
that it is exactly that window; any other mask takes the modules.

$TANDEM_CPU_FUSED_DECODE=0 keeps every layer on its modules (the A/B switch).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tandem.cpu.engine import CPUEngine, decode_layer_spec, default_engine
from tandem.engine.kv_cache import GrowingLayer
from tandem.ops.decode_step_cpu import install_fast_decode
from tandem.ops.experts_cpu import ExpertsCPU
from tandem.ops.linear_cpu import QuantLinearCPU
from tandem.ops.norm import RMSNorm
from tandem.ops.routers import SoftmaxTopKRouter

FUSED_ENV = "TANDEM_CPU_FUSED_DECODE"
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class Unfusable(Exception):
    """Why a layer keeps its modules (a reason, not an error)."""


def fused_decode_enabled() -> bool:
    return os.environ.get(FUSED_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _linear(module: nn.Module | None, name: str):
    if not isinstance(module, QuantLinearCPU) or module.backend != "engine" or len(module.parts) != 1:
        raise Unfusable(f"{name} is not one engine linear layer")
    return module.parts[0]


def _norm(module: nn.Module | None, size: int, name: str) -> RMSNorm:
    if not isinstance(module, RMSNorm) or module.hidden_size != size or module.scale.device.type != "cpu":
        raise Unfusable(f"{name} is not an RMSNorm of {size} on the CPU")
    return module


class FusedDecodeLayer:
    """The fused forward of one decoder layer; everything else goes to the layer's own forward."""

    def __init__(self, layer: nn.Module, config, engine: CPUEngine):
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            raise Unfusable("not a self-attention + MLP layer")
        self.layer_idx = int(getattr(attn, "layer_idx", -1))
        layer_types = getattr(config, "layer_types", None)
        kind = layer_types[self.layer_idx] if layer_types else "full_attention"
        if kind not in ("full_attention", "sliding_attention"):
            raise Unfusable(f"{kind} layer")
        self.window = int(config.sliding_window) if kind == "sliding_attention" else 0
        hidden = int(config.hidden_size)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn, "head_dim", hidden // self.n_heads))
        self.keep: list = []  # every object whose memory the native layer points into
        spec = decode_layer_spec()
        spec.hidden, spec.n_heads, spec.n_kv_heads, spec.head_dim = (
            hidden,
            self.n_heads,
            self.n_kv,
            self.head_dim,
        )
        spec.attn_scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        spec.window = self.window
        for name in ("q", "k", "v", "o"):
            module = getattr(attn, f"{name}_proj", None)
            part = _linear(module, f"self_attn.{name}_proj")
            spec.set_matrix(name, part._op)
            self.keep.append(part)
            if module.bias is not None:
                spec.set_bias(name, module.bias.data_ptr())
                self.keep.append(module.bias)
        if getattr(attn, "softcap", None) or getattr(config, "attn_logit_softcapping", None):
            raise Unfusable("attention logit soft-capping")
        self._set_norm(
            spec, "attn", _norm(getattr(layer, "input_layernorm", None), hidden, "input_layernorm")
        )
        for name in ("q", "k"):
            module = getattr(attn, f"{name}_norm", None)
            if module is not None:
                self._set_norm(spec, name, _norm(module, self.head_dim, f"self_attn.{name}_norm"))
        post_attn = _norm(
            getattr(layer, "post_attention_layernorm", None), hidden, "post_attention_layernorm"
        )
        pre_ffn = getattr(layer, "pre_feedforward_layernorm", None)
        if pre_ffn is None:  # Llama's naming: the norm after attention is the MLP's input norm
            self._set_norm(spec, "ffn", post_attn)
        else:  # Gemma's: attention output and MLP output normed too
            self._set_norm(spec, "post_attn", post_attn)
            self._set_norm(spec, "ffn", _norm(pre_ffn, hidden, "pre_feedforward_layernorm"))
            post_ffn = getattr(layer, "post_feedforward_layernorm", None)
            self._set_norm(spec, "post_ffn", _norm(post_ffn, hidden, "post_feedforward_layernorm"))
        self._set_feed_forward(spec, mlp, config)
        try:
            self.native = engine.decode_layer(spec)
        except ValueError as error:
            raise Unfusable(str(error)) from None
        self.spec = spec

    def _set_norm(self, spec, name: str, module: RMSNorm) -> None:
        spec.set_norm(name, module.scale.data_ptr(), module.eps)
        self.keep.append(module.scale)

    def _set_gated(self, spec, mlp: nn.Module, prefix: str) -> None:
        for name in ("gate", "up", "down"):
            part = _linear(getattr(mlp, f"{name}_proj", None), f"{prefix}.{name}_proj")
            spec.set_matrix(name, part._op)
            self.keep.append(part)

    def _set_feed_forward(self, spec, mlp: nn.Module, config) -> None:
        experts = getattr(mlp, "experts", None)
        if experts is None:  # a gated MLP
            act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
            if act not in ACTIVATIONS:
                raise Unfusable(f"activation {act!r}")
            spec.act = ACTIVATIONS[act]
            self._set_gated(spec, mlp, "mlp")
            return
        router = getattr(mlp, "gate", None)
        if not isinstance(experts, ExpertsCPU) or experts.engine_experts is None:
            raise Unfusable("routed experts are not on the engine")
        if not isinstance(router, SoftmaxTopKRouter) or router._engine_linear is None:
            raise Unfusable("the router is not a softmax top-k router on the engine")
        spec.set_experts(experts.engine_experts._op)
        spec.set_matrix("router", router._engine_linear._op)
        spec.top_k, spec.renormalize = router.top_k, router.renormalize
        self.keep += [experts.engine_experts, router._engine_linear]
        shared = getattr(mlp, "shared_expert", None)
        if shared is not None:
            self._set_gated(spec, shared, "mlp.shared_expert")
            gate = getattr(mlp, "shared_expert_gate", None)
            if gate is not None:
                part = _linear(gate, "mlp.shared_expert_gate")
                spec.set_matrix("shared_gate", part._op)
                self.keep.append(part)
        elif any(hasattr(mlp, n) for n in ("shared_experts", "shared_expert_gate")):
            raise Unfusable("shared experts of another form")

    def step(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: GrowingLayer):
        """hidden_states [1, 1, H] float32 -> the layer's output; appends this position to `cache`."""
        x = hidden_states.contiguous()
        out = torch.empty_like(x)
        cos, sin = cos.contiguous(), sin.contiguous()
        k, v, pos = cache.next_row(self.n_kv, self.head_dim)
        self.native.step(
            x.data_ptr(),
            out.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            k.shape[2],
            pos,
        )
        cache.advance()
        return out


class _Forward:
    """A decoder layer's forward: the fused step where it applies, the original otherwise."""

    def __init__(self, fused: FusedDecodeLayer, original):
        self.fused = fused
        self.original = original
        self.calls = 0  # fused steps taken (tests, benchmarks)

    def _mask_fits(self, mask, layer) -> bool:
        """No mask, or (sliding-window layer) exactly the window over the cached positions and the new one."""
        if mask is None:
            return True
        window = self.fused.window
        if not window or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            return False
        t = layer.attended() + 1  # a WindowLayer hands attention its kept positions only
        if mask.shape != (1, 1, 1, t):
            return False
        first = max(0, t - window)
        return bool(mask[..., first:].all()) and not bool(mask[..., :first].any())

    def __call__(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rotary = kwargs.get("position_embeddings")
        layers = getattr(cache, "layers", None)
        fits = (
            not args
            and isinstance(hidden_states, torch.Tensor)
            and hidden_states.shape[:-1] == (1, 1)
            and hidden_states.dtype == torch.float32
            and hidden_states.device.type == "cpu"
            and isinstance(rotary, tuple)
            and len(rotary) == 2
            and all(
                t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() == self.fused.head_dim
                for t in rotary
            )
            and layers is not None
            and len(layers) > self.fused.layer_idx
            and isinstance(layers[self.fused.layer_idx], GrowingLayer)
            and self._mask_fits(kwargs.get("attention_mask"), layers[self.fused.layer_idx])
        )
        if not fits:
            return self.original(hidden_states, *args, **kwargs)
        self.calls += 1
        return self.fused.step(hidden_states, rotary[0], rotary[1], layers[self.fused.layer_idx])


def decoder_layers(model: nn.Module):
    """The model's decoder layers (`model.model.layers` for transformers' causal LMs), or []."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def fuse_decoder_layers(model: nn.Module, engine: CPUEngine | None = None) -> dict[int, str]:
    """Give every fusable decoder layer the fused decode forward, and when all are, the model
    the fast decode step (tandem.ops.decode_step_cpu).

    Returns, per layer index, "fused" or the reason it kept its modules.
    """
    report: dict[int, str] = {}
    fused_layers = []
    if not fused_decode_enabled():
        return {i: f"{FUSED_ENV} is off" for i, _ in enumerate(decoder_layers(model))}
    engine = engine or default_engine()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for i, layer in enumerate(decoder_layers(model)):
        try:
            fused = FusedDecodeLayer(layer, config, engine)
        except Unfusable as why:
            report[i] = str(why)
            continue
        layer.forward = _Forward(fused, layer.forward)
        report[i] = "fused"
        fused_layers.append(fused)
    if fused_layers and len(fused_layers) == len(report):
        install_fast_decode(model, fused_layers)
    return report
