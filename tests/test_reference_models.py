"""The injected models against Hugging Face transformers' own loading of the same GGUF files.

Both sides dequantize the same blocks to float32 and run the same Hugging Face attention
code, so the logits differ only by floating-point summation order in tandem's operators.
Bound: relative L2 error of the logits below 1e-4 at every position, identical argmax.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem.cpu.engine import torch_reference
from tandem.engine.generate import prefill_and_generate
from tandem.inject.model import load_model


@pytest.fixture(scope="module", autouse=True)
def _torch_path():
    """These tests hold weight loading to transformers at float tolerance: the torch path.

    The C++ engine is held to this path in tests/cpu/test_engine_models.py.
    """
    with torch_reference():
        yield


LOGITS_REL_ERR = 1e-4
N_GREEDY = 32
PROMPT = "The capital of France is"


def _hf_reference(path):
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module", params=["gemma", "qwen"])
def pair(request):
    """(tandem LoadedModel, Hugging Face reference) for one real model; one pair in memory at a time."""
    path = request.getfixturevalue(f"{request.param}_gguf")
    loaded = load_model(path)
    reference = _hf_reference(path)
    yield request.param, loaded, reference
    del loaded, reference


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def _prompt_ids(loaded) -> list[int]:
    ids = list(loaded.tokenizer(PROMPT)["input_ids"])
    assert len(ids) >= 5
    return ids


def test_logits_match_transformers(pair):
    name, loaded, reference = pair
    ids = torch.tensor([_prompt_ids(loaded)])
    with torch.inference_mode():
        ours = loaded.model(ids).logits[0].float()  # [T, vocab]
        theirs = reference(ids).logits[0].float()
    rel = (ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)  # [T]
    assert rel.max().item() < LOGITS_REL_ERR, f"{name}: relative logits error {rel.max().item():.3g}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_tokens_match_transformers(pair):
    name, loaded, reference = pair
    ids = _prompt_ids(loaded)
    result = prefill_and_generate(loaded.model, loaded.tokenizer, ids, N_GREEDY)
    assert result.n_generated == N_GREEDY and result.finish_reason == "length"
    prompt = torch.tensor([ids])
    for label, model in (("tandem's model.generate", loaded.model), ("transformers", reference)):
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=N_GREEDY, do_sample=False)[0, len(ids) :].tolist()
        # generate() stops at the model's end-of-sequence token; without stop ids ours runs on.
        assert out == result.token_ids[: len(out)], f"{name}: {label} greedy tokens differ"
        assert len(out) == N_GREEDY or out[-1] in _eos_ids(model), f"{name}: {label} stopped early"
    if name == "qwen":
        assert "Paris" in result.text
