"""What the engine needs to know about a causal LM, whatever its modules were swapped for."""

import inspect
from collections.abc import Sequence

import torch

from tandem.engine.errors import EngineError


def input_device(model: torch.nn.Module) -> torch.device:
    """The device token ids must be on: that of the input embedding.

    After injection the model's first parameter may sit on another device than
    the embedding (experts in CPU RAM, the rest on the GPU), so `model.device`
    is not enough.
    """
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(getattr(emb, "ids_device", None), torch.device):  # tandem's QuantEmbedding
        return emb.ids_device
    if emb is not None:
        for t in (*emb.parameters(), *emb.buffers()):
            if t.device.type != "meta":
                return t.device
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model.forward` can skip the LM head for positions we do not need.

    The LM head over a 150k vocabulary is the largest activation in prefill;
    transformers' causal LMs take `logits_to_keep`, other models may not.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword that passes the KV cache to `model.forward`.

    transformers renamed `past_key_values` to `cache` during 5.x and warns on the old
    name; older 5.x releases and other models only know `past_key_values`.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def as_token_list(token_ids: Sequence[int] | torch.Tensor, what: str) -> list[int]:
    """Token ids given as a list, a [T] or a [1, T] tensor, as a list of ints."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() == 2 and token_ids.shape[0] == 1:
            token_ids = token_ids[0]
        if token_ids.dim() != 1:
            raise EngineError(
                f"{what} must be a list, a [T] or a [1, T] tensor, got {tuple(token_ids.shape)}"
            )
        if token_ids.is_floating_point() or token_ids.is_complex():
            raise EngineError(f"{what} must hold integers, got {token_ids.dtype}")
        return [int(t) for t in token_ids.tolist()]
    out = []
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise EngineError(f"{what} must hold integers, got {t!r}")
        out.append(t)
    return out


def check_token_range(token_ids: Sequence[int], vocab_size: int | None, what: str) -> None:
    """Reject ids outside the vocabulary before they reach an embedding lookup (or a CUDA assert)."""
    if not token_ids or vocab_size is None:
        return
    lo, hi = min(token_ids), max(token_ids)
    if lo < 0 or hi >= vocab_size:
        raise EngineError(f"{what} must be in [0, {vocab_size}), got ids from {lo} to {hi}")


def vocab_size_of(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    # Multimodal configs keep the text vocabulary in a sub-config.
    if size is None and config is not None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    return size if isinstance(size, int) else None
