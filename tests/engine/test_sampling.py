import math

import pytest
import torch

from tandem.engine.errors import EngineError
from tandem.engine.sampling import Sampler, SamplingParams, apply_repetition_penalty
from tandem.errors import TandemError

# Probabilities 1/2, 1/4, 1/8, 1/16, 1/32, 1/32 (shuffled so that order is not position).
_HALVING = torch.tensor([1 / 8, 1 / 2, 1 / 32, 1 / 4, 1 / 32, 1 / 16]).log()
_BY_RANK = [1, 3, 0, 5]  # token ids of the 1st .. 4th most likely


def _kept(params: SamplingParams, logits: torch.Tensor = _HALVING) -> set[int]:
    return set(torch.nonzero(Sampler(params).distribution(logits)).flatten().tolist())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": True},
        {"temperature": "1"},
        {"top_k": -1},
        {"top_k": 2.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": 1.0},
        {"min_p": -0.1},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
        {"seed": 1.5},
        {"seed": -1},
    ],
)
def test_invalid_params_raise(kwargs):
    with pytest.raises(TandemError) as err:
        SamplingParams(**kwargs)
    assert next(iter(kwargs)) in str(err.value)


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    gen = torch.Generator().manual_seed(0)
    greedy = Sampler(SamplingParams(temperature=0))
    top1 = Sampler(SamplingParams(temperature=1.3, top_k=1, seed=5))
    for _ in range(50):
        logits = torch.randn(300, generator=gen)
        assert greedy.sample(logits) == int(logits.argmax())
        assert top1.sample(logits) == int(logits.argmax())


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))

    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.sample(logits) for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_keeps_exactly_the_k_best_renormalised():
    dist = Sampler(SamplingParams(top_k=3)).distribution(_HALVING)
    assert set(torch.nonzero(dist).flatten().tolist()) == set(_BY_RANK[:3])
    expected = torch.tensor([1 / 2, 1 / 4, 1 / 8]) / (7 / 8)
    torch.testing.assert_close(dist[_BY_RANK[:3]], expected)


@pytest.mark.parametrize("top_p, n_kept", [(0.3, 1), (0.49, 1), (0.51, 2), (0.74, 2), (0.76, 3), (0.9, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, n_kept):
    assert _kept(SamplingParams(top_p=top_p)) == set(_BY_RANK[:n_kept])


def test_a_top_p_below_float32s_smallest_keeps_the_best_token():
    # 5e-324 is 0 in float32, where the mass above the top token (0) is compared with it.
    assert _kept(SamplingParams(top_p=5e-324)) == set(_BY_RANK[:1])
    assert Sampler(SamplingParams(top_p=5e-324, temperature=1.0, seed=3)).sample(_HALVING) == _BY_RANK[0]


@pytest.mark.parametrize("min_p, n_kept", [(0.9, 1), (0.6, 1), (0.4, 2), (0.2, 3), (0.1, 4), (0.05, 6)])
def test_min_p_drops_tokens_below_fraction_of_top(min_p, n_kept):
    kept = _kept(SamplingParams(min_p=min_p))
    assert len(kept) == n_kept
    assert set(_BY_RANK[: min(n_kept, 4)]) <= kept


def test_top_p_sees_the_top_k_renormalised_distribution():
    # After top_k=2 the two survivors have 2/3 and 1/3: the mass above the second is
    # 2/3 >= 0.6, so top_p drops it; on the full distribution (1/2) it would stay.
    assert _kept(SamplingParams(top_p=0.6)) == set(_BY_RANK[:2])
    assert _kept(SamplingParams(top_k=2, top_p=0.6)) == set(_BY_RANK[:1])


def test_temperature_scales_logits_before_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    dist = Sampler(SamplingParams(temperature=2.0)).distribution(logits)
    torch.testing.assert_close(dist, torch.softmax(logits / 2.0, dim=0))


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1, 4], 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, 0.5, -1.0]))
    assert logits[0] == 2.0  # the input is left alone
    assert apply_repetition_penalty(logits, [], 2.0) is logits


def test_repetition_penalty_applies_before_greedy_and_temperature():
    logits = torch.tensor([3.0, 2.5, -1.0])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler(params).sample(logits, seen_ids=[0]) == 1
    dist = Sampler(SamplingParams(temperature=0.5, repetition_penalty=2.0)).distribution(logits, [0, 2])
    torch.testing.assert_close(dist, torch.softmax(torch.tensor([1.5, 2.5, -2.0]) / 0.5, dim=0))


def test_samples_follow_the_distribution_and_skip_masked_tokens():
    sampler = Sampler(SamplingParams(top_k=3, seed=0))
    n = 4000
    counts = torch.bincount(torch.tensor([sampler.sample(_HALVING) for _ in range(n)]), minlength=6)
    assert counts[[2, 4, 5]].sum() == 0
    for tok, p in zip(_BY_RANK[:3], [4 / 7, 2 / 7, 1 / 7], strict=True):
        # Five standard deviations of a binomial count.
        assert abs(counts[tok] - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_bad_logits_and_seen_ids_raise():
    sampler = Sampler(SamplingParams(repetition_penalty=1.1))
    with pytest.raises(EngineError):
        sampler.sample(torch.zeros(2, 3))
    with pytest.raises(EngineError):
        sampler.sample(torch.zeros(3), seen_ids=[5])


def test_presence_and_frequency_penalties_follow_openai():
    # OpenAI's rule: logit[t] - frequency * count[t] - presence * (count[t] > 0), over the output.
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    generated = [1, 1, 3]
    p = SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    want = torch.softmax(torch.tensor([2.0, 1.0 - 0.5 - 0.5, 0.5, -1.0 - 0.25 - 0.5]), 0)
    got = Sampler(p).distribution(logits, seen_ids=[0, 2], generated_ids=generated)
    torch.testing.assert_close(got, want)
    # The prompt alone (seen, not generated) is not penalised.
    plain = Sampler(p).distribution(logits, seen_ids=[0, 1, 2, 3])
    torch.testing.assert_close(plain, torch.softmax(logits, 0))


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_penalties_outside_openais_range_are_refused(name):
    with pytest.raises(EngineError, match=name):
        SamplingParams(**{name: 2.5})
