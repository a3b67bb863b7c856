"""Token sampling: repetition penalty, temperature, top-k, top-p, min-p.

The order is that of Hugging Face transformers' logits processors (penalty
first, then temperature, then the truncations), so a seeded request means the
same distribution here as there. Each truncation keeps a prefix of the
candidates sorted by probability, which is why one sort serves all three.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.engine.errors import EngineError


def _is_number(value: object) -> bool:
    # bool is an int subclass; `temperature=True` is a bug in the caller, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token from the logits.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 turns it off.
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p; 1 turns it off.
    min_p: drop tokens less likely than min_p times the most likely one; 0 turns it off.
    repetition_penalty: divide positive / multiply negative logits of already seen tokens; 1 is off.
    presence_penalty: subtracted from the logit of every token generated so far (OpenAI's); 0 is off.
    frequency_penalty: subtracted once per time a token was generated so far (OpenAI's); 0 is off.
    seed: seeds the sampler's own generator; None draws a fresh seed.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise EngineError(f"sampling {name} must be a finite number, got {value!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise EngineError(f"sampling top_k must be an integer, got {self.top_k!r}")
        if self.temperature < 0:
            raise EngineError(f"sampling temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise EngineError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise EngineError(f"sampling min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise EngineError(
                f"sampling repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise EngineError(f"sampling {name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise EngineError(f"sampling seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise EngineError(f"sampling seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def picks_argmax(self) -> bool:
        """Greedy with no penalty: the pick is the argmax of the logits as they come."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
        )


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: Sequence[int] | torch.Tensor, penalty: float
) -> torch.Tensor:
    """Return a copy of `logits` [V] with every seen token penalised once (however often it was seen)."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = torch.as_tensor(seen_ids, dtype=torch.long).reshape(-1).unique()  # [S]
    if int(ids.min()) < 0 or int(ids.max()) >= logits.shape[0]:
        raise EngineError(f"seen token ids must be in [0, {logits.shape[0]}), got {ids.min()}..{ids.max()}")
    ids = ids.to(logits.device)
    picked = logits[ids]  # [S]
    # Dividing a negative logit would raise it; multiplying pushes it down instead.
    penalised = torch.where(picked > 0, picked / penalty, picked * penalty)
    out = logits.clone()
    out[ids] = penalised
    return out


def apply_presence_frequency(
    logits: torch.Tensor, generated_ids: Sequence[int], presence: float, frequency: float
) -> torch.Tensor:
    """logits [V] minus presence for every generated token and frequency per time it was generated."""
    if (presence == 0.0 and frequency == 0.0) or len(generated_ids) == 0:
        return logits
    ids = torch.as_tensor(generated_ids, dtype=torch.long).reshape(-1)
    if int(ids.min()) < 0 or int(ids.max()) >= logits.shape[0]:
        raise EngineError(
            f"generated token ids must be in [0, {logits.shape[0]}), got {ids.min()}..{ids.max()}"
        )
    counts = torch.bincount(ids, minlength=logits.shape[0]).to(logits.device, logits.dtype)  # [V]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


class Sampler:
    """Picks tokens under one SamplingParams with its own random generator.

    The generator lives on the CPU and only draws one uniform number per token;
    the token is found by inverting the CDF on the logits' device, so a seed
    gives the same choices whether the logits are on the CPU or a GPU (up to
    float differences in the probabilities themselves).
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        self._generator = torch.Generator(device="cpu")
        if self.params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(self.params.seed)

    def _prepare(
        self, logits: torch.Tensor, seen_ids: Sequence[int] | torch.Tensor, generated_ids: Sequence[int] = ()
    ) -> torch.Tensor:
        if logits.dim() != 1 or logits.shape[0] == 0:
            raise EngineError(f"sampler expects logits of shape [vocab], got {tuple(logits.shape)}")
        p = self.params
        logits = apply_repetition_penalty(logits.float(), seen_ids, p.repetition_penalty)
        return apply_presence_frequency(logits, generated_ids, p.presence_penalty, p.frequency_penalty)

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept token ids and their renormalised probabilities, most likely first: ([K], [K])."""
        p = self.params
        logits = logits / p.temperature  # [V]
        vocab = logits.shape[0]
        if 0 < p.top_k < vocab:
            values, ids = torch.topk(logits, p.top_k)  # [K], sorted descending
        else:
            values, ids = torch.sort(logits, descending=True)  # [V]
        probs = torch.softmax(values, dim=0)  # [K]
        n_keep = probs.shape[0]
        if p.top_p < 1.0:
            # Keep a token while the mass strictly above it is still short of top_p;
            # the most likely token has nothing above it, so it always stays (also for a
            # top_p that rounds to 0 in float32, such as 1e-46).
            above = torch.cumsum(probs, dim=0) - probs
            n_keep = min(n_keep, max(1, int((above < p.top_p).sum())))
        if p.min_p > 0.0:
            # The ratio to the top token does not change when the set is renormalised,
            # so testing against the top-k softmax is the same as after top-p.
            n_keep = min(n_keep, max(1, int((probs >= p.min_p * probs[0]).sum())))
        probs = probs[:n_keep]
        return ids[:n_keep], probs / probs.sum()

    def distribution(
        self,
        logits: torch.Tensor,
        seen_ids: Sequence[int] | torch.Tensor = (),
        generated_ids: Sequence[int] = (),
    ) -> torch.Tensor:
        """The probabilities [V] that `sample` draws from; masked tokens are exactly 0."""
        logits = self._prepare(logits, seen_ids, generated_ids)
        out = torch.zeros_like(logits)
        if self.params.greedy:
            out[torch.argmax(logits)] = 1.0
            return out
        ids, probs = self._candidates(logits)
        out[ids] = probs
        return out

    def sample(
        self,
        logits: torch.Tensor,
        seen_ids: Sequence[int] | torch.Tensor = (),
        generated_ids: Sequence[int] = (),
    ) -> int:
        """Pick one token id from `logits` [V] given the ids seen so far (prompt and output) and
        those generated so far (output only: the presence and frequency penalties)."""
        logits = self._prepare(logits, seen_ids, generated_ids)
        if self.params.greedy:
            return int(torch.argmax(logits))
        ids, probs = self._candidates(logits)
        cdf = torch.cumsum(probs, dim=0)  # [K]
        u = float(torch.rand((), generator=self._generator, dtype=torch.float64))
        target = (cdf[-1] * u).reshape(1)  # [1], on the logits' device
        # right=True so a token of probability 0 is never returned for u exactly at its edge.
        pos = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[0] - 1)
        return int(ids[pos])
