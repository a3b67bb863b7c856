"""A whole decode step of a model whose decoder layers are all fused, with one short Python loop.

Hugging Face's model forward costs about a hundred microseconds of Python per layer
around the layer itself (argument handling, masks, hooks, the cache's bookkeeping):
on 16 cores that is a sixth of a 48-layer MoE model's decode step. For the common
call — one new token of one sequence into a growable cache, no mask, nothing but
logits asked for — this forward does the same work directly: the embedding, the
rotary factors once per layer kind, each layer's native step in place on one hidden
state, the final norm and the LM head. Any other call goes to the model's forward.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from tandem.engine.kv_cache import GrowingLayer

# Keyword arguments a decode step may carry; any other one that is not None takes the model's forward.
# transformers renamed the output's cache field during 5.x.
CACHE_FIELD = next(
    (
        n
        for n in ("cache", "past_key_values")
        if n in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    ),
    "past_key_values",
)
STEP_KWARGS = {"input_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "return_dict"}


class FastDecode:
    """The model's forward, with the one-token step taken here."""

    def __init__(self, model: nn.Module, fused: list, original):
        self.model = model
        self.inner = model.model
        self.fused = fused  # FusedDecodeLayer per decoder layer, in order
        self.original = original
        config = model.config
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(fused))
        params = inspect.signature(self.inner.rotary_emb.forward).parameters
        self.rotary_by_type = "layer_type" in params
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.calls = 0  # steps taken here (tests, benchmarks)
        # Callers read the forward's parameters (logits_to_keep, the cache's keyword).
        self.__signature__ = inspect.signature(original)
        self.head_dims = {
            t: {f.head_dim for f, k in zip(fused, self.layer_types, strict=True) if k == t}
            for t in self.layer_types
        }

    def _fits(self, kwargs: dict) -> bool:
        if any(v is not None for k, v in kwargs.items() if k not in STEP_KWARGS):
            return False
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = getattr(cache, "layers", None)
        if (
            not isinstance(ids, torch.Tensor)
            or ids.shape != (1, 1)
            or ids.device.type != "cpu"
            or kwargs.get("use_cache") is False
            or kwargs.get("return_dict") is False
            or layers is None
            or len(layers) != len(self.fused)
        ):
            return False
        pos = layers[0].get_seq_length() if isinstance(layers[0], GrowingLayer) else -1
        return pos >= 0 and all(isinstance(c, GrowingLayer) and c.get_seq_length() == pos for c in layers)

    def __call__(self, *args, **kwargs):
        if args or not self._fits(kwargs):
            return self.original(*args, **kwargs)
        self.calls += 1
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = cache.layers
        pos = layers[0].get_seq_length()  # the new token's position (a WindowLayer's buffer index is not)
        h = self.inner.embed_tokens(kwargs["input_ids"]).to(torch.float32).contiguous()  # [1, 1, H]
        position_ids = torch.tensor([[pos]])
        kinds = set(self.layer_types)
        if self.rotary_by_type:
            rotary = {t: self.inner.rotary_emb(h, position_ids, t) for t in kinds}
        else:
            one = self.inner.rotary_emb(h, position_ids)
            rotary = dict.fromkeys(kinds, one)
        factors = {t: (cos.contiguous(), sin.contiguous()) for t, (cos, sin) in rotary.items()}
        if any(self.head_dims[t] != {cos.numel()} for t, (cos, _) in factors.items()):
            return self.original(*args, **kwargs)  # partial rotary: not this step's form
        addresses = {t: (cos.data_ptr(), sin.data_ptr()) for t, (cos, sin) in factors.items()}
        x = h.data_ptr()
        for fused, layer, kind in zip(self.fused, layers, self.layer_types, strict=True):
            k, row = layer._k, layer.length
            if k is None or k.shape[2] <= row:  # full: grow, or (WindowLayer) drop what no query sees
                k, _, row = layer.next_row(fused.n_kv, fused.head_dim)
            cos, sin = addresses[kind]
            fused.native.step(x, x, cos, sin, k.data_ptr(), layer._v.data_ptr(), k.shape[2], row)
        for layer in layers:
            layer.advance()
        logits = self.model.lm_head(self.inner.norm(h))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})


def install_fast_decode(model: nn.Module, fused: list) -> bool:
    """Give `model` the fast decode step when it has the modules the step uses; whether it did."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "rotary_emb", "norm")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return False
    model.forward = FastDecode(model, fused, model.forward)
    return True
