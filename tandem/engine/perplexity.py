"""Perplexity computed the way llama.cpp's `llama-perplexity` computes it, so the numbers compare.

From `perplexity()` in llama.cpp's tools/perplexity/perplexity.cpp (default, no --ppl-stride):
- the whole text is tokenized once, with special tokens (so BOS first when the vocab adds one);
- it refuses texts shorter than 2 * n_ctx tokens, even though a window needs only n_ctx;
- windows are the non-overlapping slices [i * n_ctx, (i + 1) * n_ctx), i < len // n_ctx,
  each evaluated from an empty KV cache at positions 0..n_ctx-1;
- when the vocab adds BOS, the first token of every window is replaced by BOS for the
  forward pass only (that token is never a scoring target);
- with first = n_ctx // 2, the logits at window positions first .. n_ctx - 2 score the
  tokens at first + 1 .. n_ctx - 1: n_ctx - 1 - first tokens per window;
- nll = max + log(sum exp(logit - max)) - logit[target], summed in double; the running
  value printed after each window is exp(sum nll / count);
- the `±` is the standard error of the mean nll carried through exp:
  ppl * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tandem.engine.errors import EngineError
from tandem.engine.model_io import (
    accepts_logits_to_keep,
    as_token_list,
    check_token_range,
    input_device,
    vocab_size_of,
)

# Rows of logits turned into float64 at once: [rows, V] doubles for a 150k vocabulary
# is 1.2 MB per row, so this bounds the extra memory to well under a GiB.
_ROWS_PER_BLOCK = 64


@dataclass
class PerplexityResult:
    """ppl ± ppl_stderr over n_tokens_scored tokens in n_chunks windows; running_ppl[i] after window i."""

    ppl: float
    ppl_stderr: float
    n_chunks: int
    n_tokens_scored: int
    ctx: int
    running_ppl: list[float] = field(default_factory=list)


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [N] (float64) of `targets` [N] under `logits` [N, V]."""
    out = []
    for i in range(0, logits.shape[0], _ROWS_PER_BLOCK):
        block = logits[i : i + _ROWS_PER_BLOCK].double()  # [B, V]
        tgt = targets[i : i + _ROWS_PER_BLOCK].to(block.device)  # [B]
        picked = block.gather(1, tgt[:, None])[:, 0]  # [B]
        out.append(torch.logsumexp(block, dim=1) - picked)
    return torch.cat(out).cpu()


def _check_args(ctx: int, n_chunks: int | None, bos_id: int | None, n_tokens: int) -> None:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 3:
        # ctx // 2 .. ctx - 2 must hold at least one position to score.
        raise EngineError(f"perplexity ctx must be an integer >= 3, got {ctx!r}")
    if n_chunks is not None and (isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1):
        raise EngineError(f"perplexity n_chunks must be a positive integer or None, got {n_chunks!r}")
    if bos_id is not None and (isinstance(bos_id, bool) or not isinstance(bos_id, int) or bos_id < 0):
        raise EngineError(f"perplexity bos_id must be a token id or None, got {bos_id!r}")
    if n_tokens < 2 * ctx:
        raise EngineError(
            f"perplexity with ctx={ctx} needs at least {2 * ctx} tokens (2 * ctx, as llama-perplexity "
            f"requires); the text has only {n_tokens}"
        )


def perplexity(
    model: torch.nn.Module,
    token_ids: Sequence[int] | torch.Tensor,
    ctx: int,
    *,
    n_chunks: int | None = None,
    bos_id: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `token_ids` (the whole text, tokenized once) in windows of `ctx` tokens.

    n_chunks: evaluate at most this many windows (None: all that fit).
    bos_id: put this token at the start of every window (pass the BOS id when the
        tokenizer adds BOS, as llama.cpp does; token_ids should then start with BOS too).
    progress: called after each window as progress(windows_done, n_windows, running_ppl).
    """
    tokens = as_token_list(token_ids, "token_ids")
    _check_args(ctx, n_chunks, bos_id, len(tokens))
    vocab = vocab_size_of(model)
    check_token_range(tokens, vocab, "token_ids")
    check_token_range([bos_id] if bos_id is not None else [], vocab, "bos_id")

    n_max = len(tokens) // ctx
    n = n_max if n_chunks is None else min(n_chunks, n_max)
    first = ctx // 2
    device = input_device(model)
    # Only positions first .. ctx - 1 need the LM head; the last of them predicts past the window.
    kwargs = {"logits_to_keep": ctx - first} if accepts_logits_to_keep(model) else {}

    nll_sum = 0.0
    nll2_sum = 0.0
    count = 0
    running: list[float] = []
    with torch.inference_mode():
        for i in range(n):
            window = tokens[i * ctx : (i + 1) * ctx]
            targets = torch.tensor(window[first + 1 :], dtype=torch.long)  # [ctx - 1 - first]
            if bos_id is not None:
                window = [bos_id, *window[1:]]
            ids = torch.tensor([window], dtype=torch.long, device=device)  # [1, ctx]
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0]  # [ctx or ctx - first, V]
            scored = logits[-(ctx - first) : -1]  # [ctx - 1 - first, V]: positions first .. ctx - 2
            nll = _window_nll(scored, targets)  # [ctx - 1 - first]
            nll_sum += float(nll.sum())
            nll2_sum += float((nll * nll).sum())
            count += nll.shape[0]
            running.append(math.exp(nll_sum / count))
            if progress is not None:
                progress(i + 1, n, running[-1])

    mean = nll_sum / count
    ppl = math.exp(mean)
    var = nll2_sum / count - mean * mean
    # llama.cpp prints no uncertainty when the variance comes out <= 0; with one token there is none.
    stderr = ppl * math.sqrt(var / (count - 1)) if count > 1 and var > 0 else (0.0 if count > 1 else math.nan)
    return PerplexityResult(
        ppl=ppl, ppl_stderr=stderr, n_chunks=n, n_tokens_scored=count, ctx=ctx, running_ppl=running
    )
