"""Each architecture, from a tiny random Hugging Face model written to GGUF, loads back to the same logits."""

from __future__ import annotations

import gguf
import pytest
import torch
from tiny_models import tiny_model, write_gguf

from tandem.cpu.engine import torch_reference
from tandem.inject.loader import build_meta_model, default_rules, optimize_and_load_gguf
from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile


@pytest.fixture(scope="module", autouse=True)
def _torch_path():
    """These tests hold weight loading to transformers at float tolerance: the torch path.

    The C++ engine is held to this path in tests/cpu/test_engine_models.py.
    """
    with torch_reference():
        yield


F32_REL_ERR = 1e-5  # same float32 weights: only summation order differs
Q8_REL_ERR = 0.05  # Q8_0 weights against the float32 model: quantization error


def _load(path, rules=None):
    gguf_file = GGUFFile.open(path)
    config = config_of(gguf_file)
    model = build_meta_model(config)
    optimize_and_load_gguf(model, rules or default_rules(gguf_file.architecture), gguf_file, config)
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_f32_roundtrip_matches_hf(arch, tmp_path):
    reference = tiny_model(arch)
    model = _load(write_gguf(reference, arch, tmp_path / f"{arch}.gguf"))
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _rel_err(model(ids).logits, reference(ids).logits) < F32_REL_ERR


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_roundtrip_close_to_hf(arch, tmp_path):
    reference = tiny_model(arch)
    model = _load(write_gguf(reference, arch, tmp_path / f"{arch}.gguf", gguf.GGMLQuantizationType.Q8_0))
    ids = torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        err = _rel_err(model(ids).logits, reference(ids).logits)
    assert 0 < err < Q8_REL_ERR


def test_llama_rows_are_unpermuted(tmp_path):
    """Without undoing llama.cpp's Q/K interleaving the logits would be far off: the test can fail."""
    reference = tiny_model("llama")
    path = write_gguf(reference, "llama", tmp_path / "llama.gguf")
    model = _load(path)
    q_ours = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_ours, reference.model.layers[0].self_attn.q_proj.weight)


def test_dequant_per_call_equals_at_load(tmp_path):
    reference = tiny_model("qwen2")
    path = write_gguf(reference, "qwen2", tmp_path / "q.gguf", gguf.GGMLQuantizationType.Q8_0)
    rules = tmp_path / "per_call.yaml"
    rules.write_text(
        "- match: {class: torch.nn.Linear}\n"
        "  replace: {class: tandem.ops.linear.QuantLinear, kwargs: {dequant: call}}\n"
        "- match: {name: '^model\\\\.embed_tokens$'}\n"
        "  replace: {class: tandem.ops.embedding.QuantEmbedding, kwargs: {dequant: load}}\n"
    )
    per_call, at_load = _load(path, rules), _load(path)
    assert per_call.model.layers[0].mlp.up_proj.weight is None  # really kept as blocks
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.allclose(per_call(ids).logits, at_load(ids).logits, rtol=0, atol=1e-5)


def test_generate_after_injection_matches_hf(tmp_path):
    reference = tiny_model("llama", tie=True)
    model = _load(write_gguf(reference, "llama", tmp_path / "llama.gguf"))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        ours = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        theirs = reference.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert torch.equal(ours, theirs)


def test_split_set_loads_like_one_file(tmp_path):
    reference = tiny_model("gemma3")
    single = _load(write_gguf(reference, "gemma3", tmp_path / "m.gguf"))
    (tmp_path / "split").mkdir()
    write_gguf(reference, "gemma3", tmp_path / "split" / "m.gguf", split_max_tensors=7)
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(parts) > 2 and parts[0].name.endswith("-00001-of-" + f"{len(parts):05d}.gguf")
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.inference_mode():
        expected = single(ids).logits
        for path in (tmp_path / "split", parts[0]):  # a directory or its first part
            assert torch.equal(_load(path)(ids).logits, expected)
