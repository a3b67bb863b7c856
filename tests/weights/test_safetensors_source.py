"""Hugging Face directories (config.json + safetensors) load to the Hugging Face model's logits and tokens:
transformers' per-expert layout, the fused layout, sharded files, BF16 and block-wise FP8 weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors_helpers import (
    CHAT_TEMPLATE,
    dequantize_reference,
    greedy,
    quantize_fp8_blocks,
    rel_err,
    save_fused,
    save_hf,
    tiny_model,
)
from transformers import AutoModelForCausalLM

from tandem.inject.model import load_model
from tandem.ops.experts import QuantExperts
from tandem.ops.mla import MLAttention
from tandem.weights.safetensors_file import SafetensorsFile, is_hf_directory
from tandem.weights.safetensors_fp8 import dequantize_fp8_blocks

F32_REL_ERR = 1e-5  # same float32 weights: only summation order differs (measured 0 to 2.4e-7)
PROMPT = [5, 17, 42, 8, 60, 3, 77]
FAMILIES = ["qwen2", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"]


def _check_same(reference, directory):
    loaded = load_model(directory)  # the shipped rules for the config's model_type
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want, got = reference(ids).logits, loaded.model(ids).logits
    assert rel_err(got, want) < F32_REL_ERR
    assert greedy(loaded.model, PROMPT, 16) == greedy(reference, PROMPT, 16)
    return loaded


@pytest.mark.parametrize("model_type", FAMILIES)
def test_transformers_layout(model_type, tmp_path):
    """save_pretrained writes one matrix per expert (and Mixtral's block_sparse_moe/w1..w3 names)."""
    reference = tiny_model(model_type)
    directory = save_hf(reference, tmp_path / "model")
    assert is_hf_directory(directory)
    loaded = _check_same(reference, directory)
    assert loaded.chat_template == CHAT_TEMPLATE and not loaded.chat_template_is_fallback
    assert loaded.stop_token_ids == [1, 2] and loaded.name == "model"
    if model_type != "qwen2":
        assert any(isinstance(m, QuantExperts) for m in loaded.model.modules())
    if model_type.startswith("deepseek"):
        assert any(isinstance(m, MLAttention) for m in loaded.model.modules())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_fused_layout(model_type, tmp_path):
    reference = tiny_model(model_type, seed=1)
    directory = save_fused(reference, tmp_path / "fused")
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(directory / "model.safetensors"))
    _check_same(reference, directory)


def test_sharded(tmp_path):
    reference = tiny_model("qwen3_moe", seed=2)
    directory = save_hf(reference, tmp_path / "sharded", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(SafetensorsFile.open(directory).paths) > 1
    _check_same(reference, directory)


def test_bf16_weights_are_views(tmp_path):
    """BF16 tensors are served as ggml BF16 views of the mapping and widen exactly to float32."""
    reference = tiny_model("qwen3_moe", seed=3)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(
                p.bfloat16().float()
            )  # parameters only: rotary buffers stay float32 as tandem builds them
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    directory = save_hf(bf16, tmp_path / "bf16")
    assert {v.dtype for v in load_file(directory / "model.safetensors").values()} == {torch.bfloat16}
    # against the same bf16 values computed in float32 (tandem's compute dtype): summation order only
    loaded = _check_same(reference, directory)
    experts = next(m for m in loaded.model.modules() if isinstance(m, QuantExperts))
    assert experts.gate.ggml_type.name == "BF16"
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        bf16_err = rel_err(loaded.model(ids).logits, bf16(ids).logits.float())
    assert bf16_err < 0.05  # vs transformers computing in bf16: its own rounding, measured 0.007


def test_dense_is_a_zero_copy_view(tmp_path):
    reference = tiny_model("qwen2", seed=4)
    directory = save_hf(reference, tmp_path / "m")
    f = SafetensorsFile.open(directory)
    raw = f.raw("model.norm.weight")
    entry = f.tensors["model.norm.weight"]
    assert (
        raw.numel() == entry.n_bytes
        and not raw.is_shared()
        and raw.untyped_storage().nbytes() == entry.n_bytes
    )


@pytest.mark.parametrize("shape", [(200, 300), (128, 128), (33, 7)])
def test_fp8_dequantization_matches_the_block_loop(shape):
    torch.manual_seed(5)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 4
    q, scale = quantize_fp8_blocks(w, (128, 128))
    for dtype in (torch.bfloat16, torch.float32):
        got = dequantize_fp8_blocks(q, scale, (128, 128), dtype)
        assert torch.equal(got, dequantize_reference(q, scale, (128, 128), dtype))
    assert rel_err(dequantize_fp8_blocks(q, scale, (128, 128), torch.float32), w) < 0.05


def test_fp8_model(tmp_path):
    """A DeepSeek-V3 checkpoint with every projection in block-wise FP8 (experts included, as DeepSeek ships
    them) gives the logits of the Hugging Face model holding the dequantized (BF16) weights."""
    block = (16, 16)  # DeepSeek uses 128x128; smaller blocks give this tiny model several per matrix
    reference = tiny_model("deepseek_v3", seed=6)
    directory = save_hf(reference, tmp_path / "fp8")
    state = load_file(directory / "model.safetensors")
    quantized = {}
    for name, w in state.items():
        if w.dim() == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight")):
            q, scale = quantize_fp8_blocks(w, block)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            state[name] = dequantize_reference(q, scale, block, torch.bfloat16).float()
        else:
            quantized[name] = w
    assert sum(v.dtype == torch.float8_e4m3fn for v in quantized.values()) > 20
    # the reference: transformers loading the dequantized values (it fuses the per-expert matrices itself)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    save_file(quantized, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    (directory / "config.json").write_text(json.dumps(config))
    _check_same(reference, directory)
