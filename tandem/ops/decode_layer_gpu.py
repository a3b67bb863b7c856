"""A decode step's decoder layers on the GPU, in a dozen launches each instead of three dozen.

Hugging Face's layer at one token is many tiny kernels: casts around every product,
separate q/k norms, the rotary embedding as a handful of element-wise ops per tensor,
two index copies into the cache, the router's softmax, top-k, sum and division, and the
experts' inputs concatenated and copied. Each costs a couple of microseconds however
small (a Qwen3-30B-A3B step launched 1,790, 37 a layer). After loading, every decoder
layer of a Llama-style family on a CUDA device gets a fused forward for one new token
of one sequence in a growable KV cache (tandem.engine.kv_cache):

    norm (bf16 out) → q|k|v product → qkv_rope_append (bias, q/k norms, RoPE, cache rows)
    → decode attention up to the step's position (bf16 out) → o product
    → residual add + norm → feed-forward → residual add

with the kernels of tandem.gpu.layer_kernels and tandem.gpu.decode_attention. The
position comes from the GPU (the captured graph's, tandem.engine.graph_decode), so the
same launches replay at every step. DeepSeek's layers keep MLA as their module (tandem's
MLAttention) between the fused norm and add+norm, and set it to take its fused
one-token step (tandem.gpu.mla_kernels). A feed-forward of routed experts on
the CPU engine behind a router route_pack computes (softmax top-k: Qwen3-MoE, Mixtral,
Qwen2-MoE; DeepSeek-V2's greedy and group-limited, DeepSeek-V3's biased sigmoid groups)
takes one router product and `route_pack`, which writes the engine's inputs into
page-locked memory directly and then asks for the engine's call; shared experts
(Qwen2-MoE, DeepSeek) run on the GPU while the engine computes, and `expert_sum` adds the
residual, the engine's output (read where the engine wrote it) and theirs after the
stream's wait for the answer ($TANDEM_GPU_KERNEL_HANDOVER=0: the stream writes the request,
clears the answer and copies the output back itself, the A/B switch). Any other
feed-forward runs as its module. Anything else (prompts, batches, other caches, masks
other than the causal one) takes the layer's own forward.

Fused attention: the classes of ATTENTION_CLASSES (pre-norm, q/k/v with or without
biases, optional per-head q/k norms, rotate-half RoPE over the whole head, GQA), with
q/k/v as one stacked bf16 product (tandem.ops.linear_gpu_fused) and o_proj dequantized.
$TANDEM_GPU_FUSED_DECODE=0 keeps every layer on its modules (the A/B switch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.engine.kv_cache import GrowingLayer
from tandem.env_switches import switch
from tandem.ops.decode_layer_cpu import Unfusable, decoder_layers
from tandem.ops.experts_cpu import ExpertsCPU
from tandem.ops.linear_gpu import QuantLinearGPU
from tandem.ops.mla import MLAttention
from tandem.ops.norm import RMSNorm
from tandem.ops.routers import DeepseekV2Router, DeepseekV3Router, SoftmaxTopKRouter

FUSED_ENV = "TANDEM_GPU_FUSED_DECODE"
# route_pack asks for the engine's call and expert_sum takes its answer and output, in
# place of the stream's own request, clear and copy (tandem.ops.experts_cpu.StreamCall).
KERNEL_HANDOVER_ENV = "TANDEM_GPU_KERNEL_HANDOVER"
ATTENTION_CLASSES = {
    "LlamaAttention",
    "MixtralAttention",
    "Qwen2Attention",
    "Qwen2MoeAttention",
    "Qwen3Attention",
    "Qwen3MoeAttention",
}
# Hugging Face's routers computing softmax → top-k (→ renormalised when the attribute
# named says so; True: always). tandem's routers are read by routing_of.
HF_ROUTERS = {
    "Qwen3MoeTopKRouter": "norm_topk_prob",
    "Qwen2MoeTopKRouter": "norm_topk_prob",
    "MixtralTopKRouter": True,
}


def fused_decode_enabled() -> bool:
    return switch(FUSED_ENV, default=True)


def _norm(module: nn.Module | None, size: int, name: str) -> RMSNorm:
    if not isinstance(module, RMSNorm) or module.hidden_size != size or module.scale.device.type != "cuda":
        raise Unfusable(f"{name} is not an RMSNorm of {size} on a GPU")
    return module


def _dense(module: nn.Module | None, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A QuantLinearGPU's one dequantized weight and its bias."""
    if not isinstance(module, QuantLinearGPU) or module.shared is not None or len(module.parts) != 1:
        raise Unfusable(f"{name} is not one GPU linear layer")
    weight = module.parts[0].dense
    if weight is None:
        raise Unfusable(f"{name} keeps its blocks (dequant: none)")
    return weight, module.bias


def routing_of(router: nn.Module):
    """The router's Routing (tandem.gpu.layer_kernels) and correction bias, or None where
    route_pack does not compute it."""
    from tandem.gpu.layer_kernels import Routing

    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.device.type != "cuda":
        return None
    bias = None
    name = type(router).__name__
    if name in HF_ROUTERS:
        renorm = HF_ROUTERS[name]
        routing = Routing(
            int(router.top_k), renorm if isinstance(renorm, bool) else bool(getattr(router, renorm))
        )
    elif isinstance(router, SoftmaxTopKRouter):
        routing = Routing(router.top_k, router.renormalize)
    elif isinstance(router, DeepseekV2Router):
        grouped = router.topk_method == "group_limited_greedy"
        routing = Routing(
            router.top_k,
            groups=router.num_group if grouped else 1,
            topk_group=router.topk_group if grouped else 1,
            scaling=router.routed_scaling_factor,
        )
    elif isinstance(router, DeepseekV3Router):
        routing = Routing(
            router.top_k, router.renormalize, sigmoid=True, groups=router.num_group,
            topk_group=router.topk_group, group_top2=True, renorm_eps=1e-20,
            scaling=router.routed_scaling_factor,
        )  # fmt: skip
        bias = router.e_score_correction_bias
    else:
        return None
    return (routing, bias) if routing.supported(weight.shape[0]) else None


class FusedDecodeLayerGPU:
    """The fused forward of one decoder layer (see the module's docstring)."""

    def __init__(self, layer: nn.Module, config):
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise Unfusable("no feed-forward module")
        self.hidden = int(config.hidden_size)
        self.in_norm = _norm(getattr(layer, "input_layernorm", None), self.hidden, "input_layernorm")
        self.post_norm = _norm(
            getattr(layer, "post_attention_layernorm", None), self.hidden, "post_attention_layernorm"
        )
        self.mlp = mlp
        self.route = self._route_of(mlp)
        self.kernel_handover = switch(KERNEL_HANDOVER_ENV, default=True)
        if isinstance(attn, MLAttention):  # DeepSeek: MLA runs as its module, between the fused norms
            self.attn, self.layer_idx = attn, -1
            attn.fused_gpu_step = True  # its own one-token step in fused kernels (tandem.gpu.mla_kernels)
            return
        self.attn = None
        if type(attn).__name__ not in ATTENTION_CLASSES:
            raise Unfusable(f"attention {type(attn).__name__} is not of a Llama-style family")
        self.layer_idx = int(attn.layer_idx)
        layer_types = getattr(config, "layer_types", None)
        if layer_types and layer_types[self.layer_idx] != "full_attention":
            raise Unfusable(f"{layer_types[self.layer_idx]} layer")
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            raise Unfusable("RoPE over part of the head")
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(attn.head_dim)
        if self.head_dim & (self.head_dim - 1) or self.head_dim > 512:
            raise Unfusable(f"head size {self.head_dim} is not a power of two up to 512")
        self.scaling = float(attn.scaling)
        shared = getattr(attn.q_proj, "shared", None)
        if (
            shared is None
            or len(shared.bounds) != 4
            or any(getattr(attn, f"{n}_proj", None).shared is not shared for n in "kv")
        ):
            raise Unfusable("q/k/v are not one stacked product")
        self.qkv = shared
        self.o_weight, self.o_bias = _dense(attn.o_proj, "self_attn.o_proj")
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = _norm(q_norm, self.head_dim, "q_norm") if q_norm is not None else None
        self.k_norm = _norm(k_norm, self.head_dim, "k_norm") if k_norm is not None else None
        eps = {m.eps for m in (self.q_norm, self.k_norm) if m is not None}
        if len(eps) > 1:
            raise Unfusable("q and k norms of different eps")
        self.head_eps = eps.pop() if eps else 0.0

    @staticmethod
    def _route_of(mlp: nn.Module):
        """(experts, router, Routing, correction bias) where route_pack serves the
        feed-forward, else None (the module runs)."""
        experts, router = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
        if not isinstance(experts, ExpertsCPU) or not experts.capturable or router is None:
            return None
        found = routing_of(router)
        return None if found is None else (experts, router, *found)

    @property
    def fused_attention(self) -> bool:
        return self.attn is None

    def step(
        self, x: torch.Tensor, cache: GrowingLayer | None, position: torch.Tensor | None, kwargs
    ) -> torch.Tensor:
        """x [1, 1, H] float32 -> the layer's output. Fused attention writes the cache's rows at
        `position`; a module's attention gets the layer's keywords and updates the cache itself."""
        from tandem.gpu.layer_kernels import rms_norm

        flat = x.reshape(1, self.hidden)
        if self.fused_attention:
            o, o_bias = self._attention(flat, cache, position, kwargs["position_embeddings"])
        else:
            _, n1 = rms_norm(flat, self.in_norm.scale, self.in_norm.eps)
            o = self.attn(hidden_states=n1.view(1, 1, self.hidden), **kwargs)[0].reshape(1, self.hidden)
            o_bias = None
        h, n2 = rms_norm(flat, self.post_norm.scale, self.post_norm.eps, torch.float32, o, o_bias)
        return self._feed_forward(h, n2).view(1, 1, self.hidden)

    def _attention(self, flat, cache, position, rotary) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused attention: its o product [1, H] (bf16) and o_proj's bias."""
        from tandem.gpu.decode_attention import decode_attention
        from tandem.gpu.layer_kernels import qkv_rope_append, rms_norm

        cos, sin = (t.float().reshape(-1) for t in rotary)
        _, n1 = rms_norm(flat, self.in_norm.scale, self.in_norm.eps, self.qkv.weight.dtype)
        qkv = F.linear(n1, self.qkv.weight)  # [1, (Hq + 2 Hkv) D] bf16, as the modules' product
        q = qkv_rope_append(
            qkv.reshape(-1), self.qkv.bias,
            self.q_norm.scale if self.q_norm is not None else None,
            self.k_norm.scale if self.k_norm is not None else None,
            self.head_eps, cos, sin, position, cache._k, cache._v, self.n_heads,
        )  # fmt: skip
        attn = decode_attention(
            q, cache._k, cache._v, None, self.scaling, position=position, out_dtype=self.o_weight.dtype
        )
        return F.linear(attn.reshape(1, -1), self.o_weight), self.o_bias  # [1, H] bf16

    def _feed_forward(self, h: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
        """h (the residual) and n2 (its norm) [1, H] float32 -> h + the feed-forward of n2."""
        if self.route is None:
            return h + self.mlp(n2.view(1, 1, self.hidden)).reshape(1, self.hidden).float()
        from tandem.gpu.layer_kernels import route_pack

        experts, router, routing, bias = self.route
        logits = F.linear(n2, router.weight)  # [1, E] float32, as the router's
        call = experts.stream_call(1, routing.top_k)
        signal = call.signal if self.kernel_handover else None
        route_pack(logits.reshape(-1), n2.reshape(-1), routing, call.ids.reshape(-1),
                   call.weights.reshape(-1), call.x.reshape(-1), bias, signal)  # fmt: skip
        if signal is None:
            call.request()
        shared = self._shared_experts(n2)  # on the GPU while the engine computes
        if self.kernel_handover:
            return call.finish_sum(h, shared)
        out = call.finish(n2.device)
        return h + (out if shared is None else out + shared)

    def _shared_experts(self, n2: torch.Tensor) -> torch.Tensor | None:
        """DeepSeek's shared experts, or Qwen2-MoE's shared expert times sigmoid(its gate);
        None without."""
        deepseek = getattr(self.mlp, "shared_experts", None)
        if deepseek is not None:
            return deepseek(n2).float()
        shared = getattr(self.mlp, "shared_expert", None)
        if shared is None:
            return None
        out = shared(n2)
        gate = getattr(self.mlp, "shared_expert_gate", None)
        return out if gate is None else torch.sigmoid(gate(n2)) * out


class _Forward:
    """A decoder layer's forward: the fused step where it applies, the original otherwise."""

    def __init__(self, fused: FusedDecodeLayerGPU, original):
        self.fused = fused
        self.original = original
        self.calls = 0  # fused steps taken (tests, benchmarks)

    def _layer(self, hidden_states, args, kwargs):
        """Whether the fused step applies: False, or the cache layer it writes (None for a
        module's attention, which writes its own)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = getattr(cache, "layers", None)
        fused = self.fused
        if (
            args
            or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.shape != (1, 1, fused.hidden)
            or hidden_states.dtype != torch.float32
            or hidden_states.device.type != "cuda"
            or not layers
            or not all(type(layer) is GrowingLayer for layer in layers)
        ):
            return False
        if not fused.fused_attention:
            return None  # the module takes the keywords, mask and all
        rotary = kwargs.get("position_embeddings")
        if (
            not isinstance(rotary, tuple)
            or len(rotary) != 2
            or any(t.numel() != fused.head_dim or t.device != hidden_states.device for t in rotary)
            or len(layers) <= fused.layer_idx
        ):
            return False
        layer = layers[fused.layer_idx]
        if layer._k is None or layer._k.device != hidden_states.device:
            return False
        return layer if layer.sees_every_row(kwargs.get("attention_mask")) else False

    def __call__(self, hidden_states, *args, **kwargs):
        layer = self._layer(hidden_states, args, kwargs)
        if layer is False:
            return self.original(hidden_states, *args, **kwargs)
        self.calls += 1
        if layer is None:  # the attention module writes the cache
            return self.fused.step(hidden_states, None, None, kwargs)
        position, eager = layer.step_position(hidden_states.device)
        out = self.fused.step(hidden_states, layer, position, kwargs)
        if eager:
            layer.advance()
        return out


def fuse_gpu_decoder_layers(model: nn.Module) -> dict[int, str]:
    """Give every fusable decoder layer on a GPU the fused decode forward.

    Returns, per layer index, "fused" or the reason it kept its modules."""
    layers = decoder_layers(model)
    if not fused_decode_enabled():
        return {i: f"{FUSED_ENV} is off" for i in range(len(layers))}
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    report: dict[int, str] = {}
    for i, layer in enumerate(layers):
        try:
            fused = FusedDecodeLayerGPU(layer, config)
        except Unfusable as why:
            report[i] = str(why)
            continue
        layer.forward = _Forward(fused, layer.forward)
        report[i] = "fused"
    return report
