"""MoE routers: the `gate` of a Hugging Face MoE block, in torch.

Every transformers 5.x MoE block (checked in 5.17 and 5.24) calls its router as
`router_logits, top_k_weights, top_k_index = self.gate(hidden)` and passes the last two
straight to `experts`: softmax, top-k, renormalisation and `routed_scaling_factor` all
happen inside the router, so these operators return the same triple. They compute the
logits in float32 (as DeepSeek's routers do; for a float32 model that is exactly what
every family does) and keep the same sequence of torch calls as Hugging Face's routers,
so that top-k ties and group ties break the same way (torch.topk's order). On the CPU
with the engine on, the logits come from the engine's linear op (float32 products,
summed in another order than torch's: the last bit may differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn
from transformers import PretrainedConfig

from tandem.cpu.engine import default_engine
from tandem.cpu.engine import enabled as engine_enabled
from tandem.errors import RuleError
from tandem.ops.base import TandemModule
from tandem.weights.source import GGUFWeights


def _hyper(key: str, orig: nn.Module, name: str):
    value = getattr(orig, name, None)
    if value is None:
        raise RuleError(f"{key}: {type(orig).__name__} has no {name!r}; is it an MoE router?")
    return value


FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
PROMPT_ROWS = 16  # tokens from which a float router's logits come from torch


class _Router(TandemModule):
    """Holds the [E, H] router weight and computes float32 logits."""

    def __init__(self, key: str, orig: nn.Module, config: PretrainedConfig, **base):
        super().__init__(key, orig, config, **base)
        weight = getattr(orig, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise RuleError(f"{key}: a router replaces a module with a 2-D weight, not {type(orig).__name__}")
        self.num_experts, self.hidden_dim = weight.shape
        self.top_k = int(_hyper(key, orig, "top_k"))
        if not 0 < self.top_k <= self.num_experts:
            raise RuleError(f"{key}: top_k {self.top_k} is not in 1..{self.num_experts}")
        self.weight: nn.Parameter | None = None
        self._engine_linear = None
        self._float_weight = False

    def load(self, weights: GGUFWeights) -> None:
        name, shape = f"{self.key}.weight", (self.num_experts, self.hidden_dim)
        w = weights.dense(name, shape, torch.float32, self.generate_device)
        self.weight = nn.Parameter(w, requires_grad=False)
        # On the CPU the logits come from the engine: at decode torch has one thread, the pool all.
        self._engine_linear = None
        if self.generate_device.type == "cpu" and engine_enabled() and isinstance(weights, GGUFWeights):
            part = weights.quant(name, shape)
            if default_engine().supports(part.ggml_type):
                self._engine_linear = default_engine().linear(part)
                self._float_weight = part.ggml_type in FLOAT_TYPES

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [T, E] float32
        h = hidden.reshape(-1, self.hidden_dim).to(device=self.weight.device, dtype=torch.float32)
        # A prompt's logits from float weights (most files keep the router F32): torch's
        # matrix multiply, all threads, beats the engine's float dot kernel many times over.
        if self._engine_linear is not None and not (self._float_weight and h.shape[0] >= PROMPT_ROWS):
            return self._engine_linear(h)
        return F.linear(h, self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, top_k={self.top_k}"


class SoftmaxTopKRouter(_Router):
    """Softmax over all experts, top-k, optional renormalisation of the k weights.

    Replaces Qwen2MoeTopKRouter / Qwen3MoeTopKRouter (renormalise iff `norm_topk_prob`)
    and MixtralTopKRouter (always renormalises). `renormalize` overrides the default.
    Weights come back in the input's dtype, except for Mixtral, which returns float32.
    """

    def __init__(
        self, key: str, orig: nn.Module, config: PretrainedConfig, *, renormalize: bool | None = None, **base
    ):
        super().__init__(key, orig, config, **base)
        default = getattr(orig, "norm_topk_prob", None)
        is_mixtral = type(orig).__name__.startswith("Mixtral")
        if default is None:
            default = is_mixtral
        self.renormalize = bool(default if renormalize is None else renormalize)
        # Qwen casts the k weights back to the logits' dtype; Mixtral keeps them float32.
        self.cast_back = not is_mixtral

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(hidden)  # [T, E]
        picked = self._engine_top_k(logits)
        if picked is not None:
            top_w, top_i = picked
        else:
            probs = torch.softmax(logits, dim=-1)
            top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
            if self.renormalize:
                top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if self.cast_back:
            top_w = top_w.to(hidden.dtype)
        return _back(hidden, logits, top_w, top_i)

    def _engine_top_k(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A prompt's routing on the engine, where its logits come from (the same arithmetic as
        torch's softmax and topk, in one pass per token; ties go to the lower expert id)."""
        if self._engine_linear is None or logits.shape[0] < 2:
            return None
        return self._engine_linear.engine.softmax_top_k(logits, self.top_k, self.renormalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, renormalize={self.renormalize}"


def _group_mask(group_scores: torch.Tensor, topk_group: int, group_size: int) -> torch.Tensor:
    """[T, G] group scores -> [T, E] bool mask of the experts in the best `topk_group` groups."""
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    n_tokens, n_group = group_scores.shape
    return group_mask.unsqueeze(-1).expand(n_tokens, n_group, group_size).reshape(n_tokens, -1).bool()


class _GroupedRouter(_Router):
    """Shared parsing of DeepSeek's group settings and routed_scaling_factor."""

    def __init__(self, key: str, orig: nn.Module, config: PretrainedConfig, **base):
        super().__init__(key, orig, config, **base)
        self.routed_scaling_factor = float(getattr(orig, "routed_scaling_factor", 1.0))
        self.num_group = getattr(orig, "num_group", None)
        self.topk_group = getattr(orig, "topk_group", None)

    def check_groups(self) -> None:
        g, tg = self.num_group, self.topk_group
        if g is None or tg is None or g <= 0 or self.num_experts % g or not 0 < tg <= g:
            raise RuleError(
                f"{self.key}: group-limited routing needs n_group dividing {self.num_experts} experts "
                f"and 0 < topk_group <= n_group, got n_group={g}, topk_group={tg}"
            )


class DeepseekV2Router(_GroupedRouter):
    """DeepSeek-V2: softmax scores, `greedy` or `group_limited_greedy` top-k, times routed_scaling_factor.

    Group score = the best expert score in the group; experts outside the best `topk_group`
    groups are zeroed before the top-k. No renormalisation (as transformers' DeepseekV2TopkRouter).
    topk_method: overrides the replaced router's `topk_method`.
    """

    METHODS = ("greedy", "group_limited_greedy")

    def __init__(
        self, key: str, orig: nn.Module, config: PretrainedConfig, *, topk_method: str | None = None, **base
    ):
        super().__init__(key, orig, config, **base)
        self.topk_method = topk_method or getattr(orig, "topk_method", None) or "greedy"
        if self.topk_method not in self.METHODS:
            raise RuleError(
                f"{key}: topk_method must be one of {', '.join(self.METHODS)}, got {self.topk_method!r}"
            )
        if self.topk_method == "group_limited_greedy":
            self.check_groups()

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(hidden)  # [T, E]
        scores = logits.softmax(dim=-1)
        if self.topk_method == "group_limited_greedy":
            group_size = self.num_experts // self.num_group
            group_scores = scores.view(-1, self.num_group, group_size).max(dim=-1).values  # [T, G]
            mask = _group_mask(group_scores, self.topk_group, group_size)
            scores = scores.masked_fill(~mask, 0.0)
        top_w, top_i = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [T, k]
        return _back(hidden, logits, top_w * self.routed_scaling_factor, top_i)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.topk_method}, scale={self.routed_scaling_factor}"


class DeepseekV3Router(_GroupedRouter):
    """DeepSeek-V3 `noaux_tc`: sigmoid scores, bias-corrected group-limited top-k.

    Choice uses score + e_score_correction_bias; a group's score is the sum of its two best
    biased scores; the k weights are the unbiased scores of the chosen experts, renormalised
    (if `norm_topk_prob`) and times routed_scaling_factor.
    renormalize: overrides the replaced router's `norm_topk_prob`.
    """

    def __init__(
        self, key: str, orig: nn.Module, config: PretrainedConfig, *, renormalize: bool | None = None, **base
    ):
        super().__init__(key, orig, config, **base)
        if getattr(orig, "e_score_correction_bias", None) is None:
            raise RuleError(f"{key}: DeepseekV3Router needs a router with e_score_correction_bias")
        self.check_groups()
        if self.num_experts // self.num_group < 2:
            raise RuleError(f"{key}: noaux_tc routing needs at least 2 experts per group")
        default = getattr(orig, "norm_topk_prob", True)
        self.renormalize = bool(default if renormalize is None else renormalize)
        self.register_buffer("e_score_correction_bias", None)

    def load(self, weights: GGUFWeights) -> None:
        super().load(weights)
        bias = weights.dense(
            f"{self.key}.e_score_correction_bias", (self.num_experts,), torch.float32, self.generate_device
        )
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.logits(hidden)  # [T, E]
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias  # [T, E]
        group_size = self.num_experts // self.num_group
        group_scores = choice.view(-1, self.num_group, group_size).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        mask = _group_mask(group_scores, self.topk_group, group_size)
        choice = choice.masked_fill(~mask, float("-inf"))
        top_i = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # [T, k]
        top_w = scores.gather(1, top_i)
        if self.renormalize:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        return _back(hidden, logits, top_w * self.routed_scaling_factor, top_i)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, renormalize={self.renormalize}, scale={self.routed_scaling_factor}"


def _back(hidden: torch.Tensor, *outs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Results go back to the device the hidden state came from (the router may run elsewhere)."""
    return tuple(t.to(hidden.device) for t in outs)
