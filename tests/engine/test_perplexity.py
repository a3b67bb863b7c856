import math

import pytest
import torch
import torch.nn.functional as F

from tandem.engine.errors import EngineError
from tandem.engine.perplexity import perplexity

CTX = 16


@pytest.fixture(scope="module")
def tokens(byte_tokenizer) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    # 3.5 windows: the half window at the end is never scored.
    return torch.randint(2, len(byte_tokenizer), (3 * CTX + CTX // 2,), generator=gen).tolist()


def _reference(model, tokens, ctx, bos_id=None, n_windows=None):
    """The plain computation: full forward per window, cross-entropy on positions ctx//2 .. ctx-2."""
    first = ctx // 2
    nlls = []
    for i in range(n_windows or len(tokens) // ctx):
        window = list(tokens[i * ctx : (i + 1) * ctx])
        targets = torch.tensor(window[first + 1 :])
        if bos_id is not None:
            window[0] = bos_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0]  # [ctx, V]
        nlls.append(F.cross_entropy(logits[first : ctx - 1].double(), targets, reduction="none"))
    nll = torch.cat(nlls)
    ppl = math.exp(float(nll.mean()))
    var = float((nll * nll).mean() - nll.mean() ** 2)
    return ppl, ppl * math.sqrt(var / (nll.numel() - 1)), nll.numel()


class Spy(torch.nn.Module):
    """Records the windows the model is shown; its forward has no `logits_to_keep`."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.seen = model, model.config, []

    def forward(self, input_ids, **kwargs):
        self.seen.append(input_ids[0].tolist())
        return self.model(input_ids=input_ids, **kwargs)


def test_matches_the_plain_computation(tiny_model, tokens):
    got = perplexity(tiny_model, tokens, CTX)
    ppl, stderr, count = _reference(tiny_model, tokens, CTX)
    assert got.n_chunks == 3
    assert got.n_tokens_scored == count == 3 * (CTX - 1 - CTX // 2)
    assert got.ppl == pytest.approx(ppl, rel=1e-5)
    assert got.ppl_stderr == pytest.approx(stderr, rel=1e-5)
    assert len(got.running_ppl) == 3 and got.running_ppl[-1] == pytest.approx(got.ppl, rel=1e-12)
    assert got.running_ppl[0] == pytest.approx(_reference(tiny_model, tokens, CTX, n_windows=1)[0], rel=1e-5)


def test_odd_ctx_scores_from_ctx_half_rounded_down(tiny_model, tokens):
    got = perplexity(tiny_model, tokens, 15)
    ppl, _, count = _reference(tiny_model, tokens, 15)
    assert got.n_tokens_scored == count == 3 * (15 - 1 - 7)
    assert got.ppl == pytest.approx(ppl, rel=1e-5)


def test_bos_replaces_the_first_token_of_every_window(tiny_model, tokens):
    spy = Spy(tiny_model)
    got = perplexity(spy, tokens, CTX, bos_id=0)
    assert [w[0] for w in spy.seen] == [0, 0, 0]
    assert [w[1:] for w in spy.seen] == [tokens[i * CTX + 1 : (i + 1) * CTX] for i in range(3)]
    ppl, _, _ = _reference(tiny_model, tokens, CTX, bos_id=0)
    assert got.ppl == pytest.approx(ppl, rel=1e-5)
    # The BOS changes the context of every scored token, so the value must move.
    assert abs(got.ppl - perplexity(tiny_model, tokens, CTX).ppl) > 1e-6


def test_without_logits_to_keep_gives_the_same_value(tiny_model, tokens):
    assert perplexity(Spy(tiny_model), tokens, CTX).ppl == pytest.approx(
        perplexity(tiny_model, tokens, CTX).ppl, rel=1e-9
    )


def test_n_chunks_and_progress(tiny_model, tokens):
    calls = []
    got = perplexity(tiny_model, tokens, CTX, n_chunks=2, progress=lambda *a: calls.append(a))
    assert got.n_chunks == 2 and [c[:2] for c in calls] == [(1, 2), (2, 2)]
    assert calls[-1][2] == got.ppl
    assert perplexity(tiny_model, tokens, CTX, n_chunks=99).n_chunks == 3


def test_too_short_text_says_how_many_tokens_are_needed(tiny_model, tokens):
    # llama-perplexity refuses fewer than 2 * n_ctx tokens even though one window fits.
    with pytest.raises(EngineError, match=f"at least {2 * CTX} tokens.*only {2 * CTX - 1}"):
        perplexity(tiny_model, tokens[: 2 * CTX - 1], CTX)
    assert perplexity(tiny_model, tokens[: 2 * CTX], CTX).n_chunks == 2


@pytest.mark.parametrize(
    "kwargs", [{"ctx": 2}, {"ctx": 8.0}, {"n_chunks": 0}, {"bos_id": -1}, {"bos_id": 10**6}]
)
def test_bad_arguments_raise(tiny_model, tokens, kwargs):
    with pytest.raises(EngineError):
        perplexity(tiny_model, tokens, **{"ctx": CTX, **kwargs})
