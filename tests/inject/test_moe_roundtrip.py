"""MoE families (Qwen2-MoE, Qwen3-MoE, Mixtral): tiny random Hugging Face models written to GGUF
as llama.cpp writes them load back to the same logits and tokens; QuantExperts equals the
Hugging Face experts module; files whose metadata disagrees with their tensors are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from tiny_models import GGUF_ARCH, MOE_ARCHS, tiny_model, write_gguf

from tandem.cpu.engine import torch_reference
from tandem.engine.generate import prefill_and_generate
from tandem.errors import GGUFError, WeightError
from tandem.inject.loader import build_meta_model, default_rules, optimize_and_load_gguf
from tandem.ops.experts import QuantExperts
from tandem.weights.arch import config_of, get_architecture
from tandem.weights.arch.llama import Llama
from tandem.weights.arch.mixtral import Mixtral
from tandem.weights.gguf_file import GGUFFile
from tandem.weights.source import GGUFWeights
from tandem.weights.tokenizer import load_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _torch_path():
    """These tests hold weight loading to transformers at float tolerance: the torch path.

    The C++ engine is held to this path in tests/cpu/test_engine_models.py.
    """
    with torch_reference():
        yield


F32_REL_ERR = 1e-5  # same float32 weights: only summation order differs
Q8_REL_ERR = 0.03  # Q8_0 weights, router kept in float as llama-quantize does; measured 0.006-0.011
PLAIN_RULES = (  # everything as Hugging Face builds it: experts dequantized into gate_up_proj/down_proj
    "- match: {name: '^model$'}\n  replace: {class: default}\n"
)
Q8 = gguf.GGMLQuantizationType.Q8_0


def _load(path, rules=None):
    gguf_file = GGUFFile.open(path)
    config = config_of(gguf_file)
    model = build_meta_model(config)
    rules = rules or default_rules(gguf_file.architecture, gguf_file.tensors)
    optimize_and_load_gguf(model, rules, gguf_file, config)
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=MOE_ARCHS)
def family(request, tmp_path_factory):
    """(arch, Hugging Face model, F32 GGUF path with a tokenizer, Q8_0 GGUF path)."""
    arch = request.param
    reference = tiny_model(arch)
    folder = tmp_path_factory.mktemp(arch)
    f32 = write_gguf(reference, arch, folder / "f32.gguf", tokenizer=True)
    q8 = write_gguf(reference, arch, folder / "q8.gguf", Q8)
    return arch, reference, f32, q8


def test_architecture_and_rules_picked_from_tensors(family):
    arch, _, path, _ = family
    with GGUFFile.open(path) as f:
        assert f.architecture == GGUF_ARCH.get(arch, arch)
        assert default_rules(f.architecture, f.tensors).name == f"{arch}.yaml"
        assert type(config_of(f)).__name__.lower().startswith(arch[:5])
    assert type(get_architecture("llama", ["blk.0.ffn_gate_exps.weight"])) is Mixtral
    assert type(get_architecture("llama", ["blk.0.ffn_gate.weight"])) is Llama
    assert type(get_architecture("llama")) is Llama


def test_f32_roundtrip_matches_hf(family):
    _, reference, path, _ = family
    model = _load(path)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _rel_err(model(ids).logits, reference(ids).logits) < F32_REL_ERR


def test_q8_roundtrip_close_to_hf(family):
    _, reference, _, path = family
    ids = torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        err = _rel_err(_load(path)(ids).logits, reference(ids).logits)
    assert 0 < err < Q8_REL_ERR


def test_quant_experts_equal_the_plain_path(family, tmp_path):
    _, _, _, path = family
    plain_rules = tmp_path / "plain.yaml"
    plain_rules.write_text(PLAIN_RULES)
    ours, plain = _load(path), _load(path, plain_rules)
    assert ours.model.layers[1].mlp.experts.gate.ggml_type == Q8  # really kept as blocks
    assert plain.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.allclose(ours(ids).logits, plain(ids).logits, rtol=0, atol=1e-5)


def test_greedy_tokens_match_hf(family):
    _, reference, path, _ = family
    model = _load(path)
    with GGUFFile.open(path) as f:
        tokenizer = load_tokenizer(f.metadata)
    prompt = [1, 5, 9, 13, 17]
    with torch.inference_mode():
        theirs = reference.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        ours = model.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        loop = prefill_and_generate(model, tokenizer, prompt, max_new_tokens=16).token_ids
    assert ours == theirs
    assert loop == theirs
    assert len(set(theirs)) > 2  # not a degenerate repetition that any model would produce


def _routing(kind: str, tokens: int, experts: int, k: int, gen: torch.Generator):
    if kind == "random":
        index = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    elif kind == "one_expert":  # every token's first choice is expert 3, second is expert 5
        index = torch.tensor([[3, 5]]).repeat(tokens, 1)
    else:  # "few": experts 0, 2 and 7 only; the others receive nothing
        index = torch.tensor([[0, 2], [7, 0], [2, 7]]).repeat(tokens // 3 + 1, 1)[:tokens]
    weights = torch.rand(tokens, k, generator=gen)
    return index, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["random", "one_expert", "few"])
def test_quant_experts_match_hf_experts_module(family, kind):
    _, reference, path, _ = family
    ours = _load(path).model.layers[1].mlp.experts
    theirs = reference.model.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(4)
    for tokens in (1, 7, 32):
        hidden = torch.randn(tokens, 64, generator=gen)
        index, weights = _routing(kind, tokens, 8, 2, gen)
        with torch.inference_mode():
            expected = theirs(hidden, index, weights)
            assert _rel_err(ours(hidden, index, weights), expected) < F32_REL_ERR
    with torch.inference_mode():  # no tokens at all
        assert ours(torch.zeros(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)).shape == (
            0,
            64,
        )


def test_expert_views_share_the_mapped_bytes(family):
    _, _, _, path = family
    with GGUFFile.open(path) as f:
        stacked = f.tensor("blk.0.ffn_up_exps.weight")  # [E, I, H]
        e, i, h = stacked.shape
        dense = stacked.dequantize()
        for index in (0, 5, e - 1):
            view = stacked.expert(index)
            assert (
                view.shape == (i, h)
                and view.data.data_ptr() == stacked.data.data_ptr() + index * view.n_bytes
            )
            assert torch.equal(view.dequantize(), dense[index])
        with pytest.raises(IndexError):
            stacked.expert(e)
        with pytest.raises(WeightError, match="3-D"):
            stacked.expert(0).expert(0)


def test_fused_parameter_is_refused_whole_and_given_in_parts(family):
    _, reference, path, _ = family
    with GGUFFile.open(path) as f:
        config = config_of(f)
        weights = GGUFWeights(f, get_architecture(f.architecture, f.tensors), config)
        name = "model.layers.0.mlp.experts.gate_up_proj"
        with pytest.raises(WeightError, match="fused from 2 GGUF tensors"):
            weights.quant(name)
        with pytest.raises(WeightError, match="do not stack"):
            weights.quant_parts(name, (8, 48, 64))
        gate, up = weights.quant_parts(name, (8, 64, 64))
        assert gate.name.endswith("ffn_gate_exps.weight") and up.name.endswith("ffn_up_exps.weight")
        expected = reference.model.layers[0].mlp.experts.gate_up_proj
        assert torch.equal(weights.dense(name, tuple(expected.shape)), expected.detach())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("expert_count", 6, r"ffn_gate_inp.weight.*expert_count = 6"),
        ("expert_used_count", 9, r"expert_used_count.*outside"),
        ("width", 48, r"ffn_gate_exps.*has shape \[8, 32, 64\].* = 48"),
        ("attention.key_length", 8, r"attn_q.weight.*key_length = 8"),
    ],
)
def test_metadata_that_disagrees_with_tensors_is_refused(family, key, value, message):
    arch, _, path, _ = family
    gguf_arch = GGUF_ARCH.get(arch, arch)
    if key == "width":
        key = "feed_forward_length" if arch == "mixtral" else "expert_feed_forward_length"
    with GGUFFile.open(path) as f:
        metadata = {**f.metadata, f"{gguf_arch}.{key}": value}
        shapes = {name: info.shape for name, info in f.tensors.items()}
    with pytest.raises(GGUFError, match=message):
        get_architecture(gguf_arch, shapes).hf_config(metadata, shapes)


def test_cli_generates_from_a_tiny_moe(family):
    arch, _, path, _ = family
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "generate", "--model", str(path), "--prompt", "ABCD",
         "--max-new-tokens", "6", "--temperature", "0"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), f"{arch}: no text generated"
