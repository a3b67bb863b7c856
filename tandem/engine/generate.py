"""The generation loop: prefill the prompt into a KV cache, then decode token by token.

Works with any transformers 5.x causal LM (`model(input_ids=..., past_key_values=cache,
use_cache=True).logits`, or `cache=` where the model's forward names it so), whether its
modules are Hugging Face's or tandem's.
"""

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import Cache

from tandem.engine.errors import EngineError
from tandem.engine.graph_decode import GraphDecode
from tandem.engine.kv_cache import new_cache
from tandem.engine.model_io import (
    accepts_logits_to_keep,
    as_token_list,
    cache_kwarg,
    check_token_range,
    input_device,
    vocab_size_of,
)
from tandem.engine.sampling import Sampler, SamplingParams
from tandem.engine.stops import TextStream

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationResult:
    """One finished generation.

    token_ids: the new tokens only, including a stop token id or the tokens that
        spelled a stop string (they were generated), though neither is in `text`.
    text: the new text, ending before any stop string; equal to the concatenated
        `on_text` pieces.
    prefill_s: prompt forward passes plus picking the first new token (time to first token).
    decode_s: everything after, i.e. the `n_generated - 1` decode steps.
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    n_prompt: int
    n_generated: int
    prefill_s: float
    decode_s: float
    n_cached: int = 0  # prompt tokens whose keys and values came from a PromptCache

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens computed per second (cached ones took no time)."""
        computed = self.n_prompt - self.n_cached
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second: the first new token came from prefill, so it is not counted."""
        steps = self.n_generated - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class PromptCache:
    """A KV cache kept from one generation to the next, with the token ids it holds.

    When the next prompt starts with exactly those ids (a chat: the previous prompt,
    the reply, then the new message), only the new tokens are prefilled. Anything
    else starts a fresh cache, so reuse never changes the result.
    """

    kv: Cache | None = None
    ids: list[int] = field(default_factory=list)

    def clear(self) -> None:
        self.kv, self.ids = None, []

    def reusable(self, prompt: list[int]) -> int:
        """How many leading prompt tokens the cache already holds (0: start afresh)."""
        n = len(self.ids)
        if self.kv is None or n == 0 or n >= len(prompt) or prompt[:n] != self.ids:
            return 0
        return n


def _sync(device: torch.device) -> None:
    # CUDA work is asynchronous; without this a timer measures only the launches.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_last_logits(model: torch.nn.Module, ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run `ids` [1, T] through the model, appending to the cache in `kwargs`; return the last logits [V]."""
    return model(input_ids=ids, use_cache=True, **kwargs).logits[0, -1]  # [V]


def _prefill(
    model: torch.nn.Module,
    prompt: list[int],
    chunk: int,
    device: torch.device,
    kwargs: dict,
) -> torch.Tensor:
    """Fill the cache with the prompt, `chunk` tokens per forward pass; return the next-token logits [V]."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, T]
    logits = None
    for start in range(0, len(prompt), chunk):
        logits = _forward_last_logits(model, ids[:, start : start + chunk], kwargs)
    return logits


# Prompt tokens per forward pass of a model on a GPU: its activations must fit the plan's
# headroom (docs/hybrid.md), and each pass of a hybrid model copies its experts over once,
# so the passes are as long as that allows.
GPU_PREFILL_CHUNK = 2048


def default_prefill_chunk(model: torch.nn.Module, n_prompt: int) -> int:
    """The whole prompt on the CPU; GPU_PREFILL_CHUNK tokens at a time on a GPU."""
    on_gpu = any(p.device.type == "cuda" for p in model.parameters())
    return min(n_prompt, GPU_PREFILL_CHUNK) if on_gpu else n_prompt


def _check_args(
    max_new_tokens: int, prefill_chunk: int | None, stop_token_ids: Iterable[int]
) -> frozenset[int]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise EngineError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prefill_chunk is not None and (
        isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk <= 0
    ):
        raise EngineError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    stops = frozenset(as_token_list(list(stop_token_ids), "stop_token_ids"))
    return stops


def prefill_and_generate(
    model: torch.nn.Module,
    tokenizer,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: SamplingParams | None = None,
    stop_token_ids: Iterable[int] = (),
    stop_strings: Iterable[str] = (),
    on_text: Callable[[str], None] | None = None,
    prefill_chunk: int | None = None,
    prompt_cache: PromptCache | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after the prompt `input_ids` (a list, [T] or [1, T]).

    sampling: None means greedy. Stops at the first stop token id or stop string
    ("stop"), else after `max_new_tokens` tokens ("length"). `on_text` receives the
    text as it becomes safe to show (never half a character, never what might yet
    be a stop string). `prefill_chunk` bounds the tokens per prefill forward pass
    (default: the whole prompt on the CPU, GPU_PREFILL_CHUNK tokens on a GPU).
    `prompt_cache` keeps the KV cache for the next call (see PromptCache).
    `cancel`: when set (from another thread), generation ends before the next decode step
    with finish_reason "cancelled" (a client that went away).
    """
    prompt = as_token_list(input_ids, "input_ids")
    if not prompt:
        raise EngineError("the prompt is empty: generation needs at least one input token")
    stop_ids = _check_args(max_new_tokens, prefill_chunk, stop_token_ids)
    vocab = vocab_size_of(model)
    check_token_range(prompt, vocab, "prompt token ids")
    sampler = Sampler(sampling if sampling is not None else SamplingParams(temperature=0.0))
    stream = TextStream(tokenizer, stop_strings, context_ids=prompt)
    device = input_device(model)
    chunk = prefill_chunk if prefill_chunk is not None else default_prefill_chunk(model, len(prompt))

    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    out_ids: list[int] = []
    # Repetition penalty looks at prompt and output alike, as transformers does.
    seen = list(prompt)
    finish: FinishReason = "length"
    with torch.inference_mode():
        # Sized from the config so that sliding-window and hybrid layers get their own cache kind.
        cached = prompt_cache.reusable(prompt) if prompt_cache is not None else 0
        kv = prompt_cache.kv if cached else new_cache(model)
        if prompt_cache is not None:
            prompt_cache.clear()  # filled again only if this call completes
        kwargs = {cache_kwarg(model): kv}
        if accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = 1
        t0 = time.perf_counter()
        logits = _prefill(model, prompt[cached:], chunk, device, kwargs)
        token = sampler.sample(logits, seen, out_ids)  # .item() inside waits for the device
        _sync(device)
        t1 = time.perf_counter()
        # A model on a CUDA GPU replays its decode step from a captured graph (graph_decode.py).
        graph = GraphDecode.for_model(model, cache_kwarg(model))
        if graph is not None and graph.fits(kv):
            graph.reserve(kv, len(prompt) + max_new_tokens)
        picks = None  # greedy steps chained on the GPU, one queued ahead (GraphDecode.greedy_tokens)
        try:
            while True:
                out_ids.append(token)
                seen.append(token)
                if token in stop_ids:
                    finish = "stop"
                    break
                emit(stream.push(token))
                if stream.stopped:
                    finish = "stop"
                    break
                if len(out_ids) >= max_new_tokens:
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if picks is not None:
                    token = next(picks)
                    continue
                if graph is not None and graph.broken is None and graph.fits(kv):
                    left = max_new_tokens - len(out_ids)
                    if sampler.params.picks_argmax and graph.ready(kv, kv.layers[0].length + left):
                        picks = graph.greedy_tokens(kv, token, left)
                        token = next(picks)
                        continue
                    logits = graph.step(kv, token)
                else:
                    step = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
                    logits = _forward_last_logits(model, step, kwargs)
                token = sampler.sample(logits, seen, out_ids)
        finally:
            if picks is not None:
                picks.close()  # a step queued past the last pick leaves the cache
        emit(stream.flush())
        _sync(device)
        t2 = time.perf_counter()
    if prompt_cache is not None:
        # The last token was sampled but never fed to the model, so it is not in the cache.
        prompt_cache.kv, prompt_cache.ids = kv, prompt + out_ids[:-1]
    return GenerationResult(
        token_ids=out_ids,
        text="".join(pieces),
        finish_reason=finish,
        n_prompt=len(prompt),
        n_generated=len(out_ids),
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        n_cached=cached,
    )
