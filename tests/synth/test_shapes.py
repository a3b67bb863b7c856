"""tandem.synth: shape tables, the Q4_K_M mix, random blocks, and files that reopen clean.

Full-size files are written only where they stay under ~1 GB (qwen3-30b-a3b with
one layer, deepseek-v2-lite with two); the larger shapes are checked on their
tensor table and byte totals, and written as scaled-down variants. Every file is
deleted by its test: tmp_path directories outlive the run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from tandem.errors import UnsupportedError
from tandem.quant.dequant import dequantize_blocks
from tandem.synth.metadata import default_tokenizer_source
from tandem.synth.quant_mix import assign_types, use_more_bits
from tandem.synth.random_blocks import SUPPORTED, WEIGHT_STD, random_blocks
from tandem.synth.shapes import SHAPES, get_shape
from tandem.synth.tensors import tensor_table
from tandem.synth.writer import plan, write_shape, write_spec
from tandem.weights.gguf_file import GGUFFile

T = GGMLQuantizationType
GIB = 1 << 30


@pytest.fixture(scope="module")
def tokenizer_source():
    return default_tokenizer_source()


@pytest.mark.parametrize("name", list(SHAPES))
def test_parameter_count_matches_the_published_one(name):
    spec = SHAPES[name]
    n = sum(t.numel for t in tensor_table(spec))
    assert abs(n / spec.params - 1) < 0.005, (
        f"{name}: {n / 1e9:.2f}B parameters, published {spec.params / 1e9}B"
    )


def test_q4_k_m_totals_match_published_files():
    # Q4_K_M files made by llama-quantize and published on Hugging Face:
    # Qwen3-30B-A3B 17.28 GiB, DeepSeek-V2-Lite(-Chat) 10.36 GB.
    assert plan("qwen3-30b-a3b").tensor_bytes / GIB == pytest.approx(17.28, rel=0.005)
    assert plan("deepseek-v2-lite").tensor_bytes / 1e9 == pytest.approx(10.36, rel=0.005)
    # And from first principles for qwen3-30b-a3b: Q4_K is 144 bytes / 256 values, Q6_K 210 / 256.
    s = SHAPES["qwen3-30b-a3b"]
    more = sum(use_more_bits(i, s.n_layer) for i in range(s.n_layer))
    expert = s.n_expert * s.hidden * s.expert_ffn
    attn_qo = 2 * s.n_head * s.head_dim * s.hidden
    attn_kv = s.n_head_kv * s.head_dim * s.hidden
    q4 = (
        s.vocab * s.hidden
        + s.n_layer * (2 * expert + attn_qo + attn_kv)
        + (s.n_layer - more) * (expert + attn_kv)
    )
    q6 = s.vocab * s.hidden + more * (expert + attn_kv)
    f32 = s.n_layer * (2 * s.hidden + 2 * s.head_dim + s.n_expert * s.hidden) + s.hidden
    assert plan("qwen3-30b-a3b").tensor_bytes == q4 // 256 * 144 + q6 // 256 * 210 + 4 * f32


def test_q4_k_m_mix_follows_llama_quantize():
    spec = get_shape("qwen3-30b-a3b")
    types = assign_types(spec, tensor_table(spec))
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    for i in range(spec.n_layer):
        more = T.Q6_K if use_more_bits(i, spec.n_layer) else T.Q4_K
        assert types[f"blk.{i}.attn_v.weight"] == more
        assert types[f"blk.{i}.ffn_down_exps.weight"] == more
        assert types[f"blk.{i}.ffn_gate_exps.weight"] == T.Q4_K
        assert types[f"blk.{i}.attn_k.weight"] == T.Q4_K
        assert types[f"blk.{i}.ffn_gate_inp.weight"] == T.F32
    assert sum(types[f"blk.{i}.ffn_down_exps.weight"] == T.Q6_K for i in range(48)) == 24

    # Mixtral: 8 experts -> attn_v and attn_k Q8_0, attn_output Q5_K.
    spec = get_shape("mixtral-8x7b")
    types = assign_types(spec, tensor_table(spec))
    assert {types[f"blk.{i}.attn_v.weight"] for i in range(32)} == {T.Q8_0}
    assert {types[f"blk.{i}.attn_k.weight"] for i in range(32)} == {T.Q8_0}
    assert {types[f"blk.{i}.attn_output.weight"] for i in range(32)} == {T.Q5_K}

    # DeepSeek-V2-Lite: 1,408-wide expert rows and 10,944-wide dense rows are not
    # multiples of 256: Q4_K falls back to Q5_0, Q6_K to Q8_0; attn_k_b (128-wide) too.
    spec = get_shape("deepseek-v2-lite")
    types = assign_types(spec, tensor_table(spec))
    assert types["blk.0.ffn_down.weight"] == T.Q8_0  # layer 0 uses more bits
    for i in range(1, spec.n_layer):
        assert types[f"blk.{i}.ffn_down_exps.weight"] == (T.Q8_0 if use_more_bits(i, 27) else T.Q5_0)
        assert types[f"blk.{i}.ffn_down_shexp.weight"] == (T.Q6_K if use_more_bits(i, 27) else T.Q4_K)
        assert types[f"blk.{i}.attn_k_b.weight"] == T.Q5_0
        assert types[f"blk.{i}.attn_v_b.weight"] == T.Q4_K
    assert "blk.1.exp_probs_b.bias" not in types

    # Q8_0: everything Q8_0 (output stays Q8_0; 8 experts push attn_v/attn_k to Q8_0 anyway).
    q8 = plan("mixtral-8x7b", quant="Q8_0")
    assert {t.ggml_type for t in q8.tensors if t.spec.kind == "weight"} == {T.Q8_0}

    spec = get_shape("deepseek-v3")
    table = tensor_table(spec)
    names = {t.name for t in table}
    assert {"blk.0.ffn_down.weight", "blk.3.exp_probs_b.bias", "blk.3.attn_q_a.weight"} <= names
    assert "blk.3.ffn_down.weight" not in names and "blk.2.ffn_gate_inp.weight" not in names


@pytest.mark.parametrize("ggml_type", SUPPORTED, ids=lambda t: t.name)
def test_random_blocks_dequantize_to_sane_values(ggml_type):
    blocks = random_blocks(ggml_type, 2048, np.random.default_rng(1))
    values = dequantize_blocks(torch.from_numpy(blocks), ggml_type)
    assert torch.isfinite(values).all()
    assert values.std().item() == pytest.approx(WEIGHT_STD, rel=0.1)
    assert abs(values.mean().item()) < 0.15 * WEIGHT_STD
    assert values.abs().max().item() < 5 * WEIGHT_STD


def test_errors_are_clear():
    with pytest.raises(UnsupportedError, match="unknown synth shape"):
        get_shape("gpt-5")
    with pytest.raises(UnsupportedError, match="unknown quantization mix"):
        plan("qwen3-30b-a3b", quant="Q3_K_XL")
    with pytest.raises(ValueError, match="layers must be 1 to 48"):
        plan("qwen3-30b-a3b", layers=49)
    with pytest.raises(ValueError, match="n_expert_used exceeds"):
        dataclasses.replace(get_shape("mixtral-8x7b"), n_expert_used=9)


def _scaled(name: str):
    """A small variant of a big shape that keeps every rule the mix and llama.cpp apply
    (row widths' divisibility, n_expert != 8 or == 8, dense-then-MoE layers)."""
    s = get_shape(name)
    if name == "mixtral-8x7b":
        return dataclasses.replace(s, vocab=4096, ffn=1024)
    if name == "deepseek-v3":
        return dataclasses.replace(s, vocab=4096, ffn=2304, expert_ffn=512, n_expert=16, leading_dense=1)
    return dataclasses.replace(s, vocab=4096, n_expert=16, expert_ffn=512)


CASES = [
    ("qwen3-30b-a3b", None, 1),  # full size, 0.9 GB
    ("deepseek-v2-lite", None, 2),  # full size, 0.8 GB: the dense layer and a MoE layer
    ("qwen3-235b-a22b", _scaled, 2),
    ("deepseek-v3", _scaled, 2),
    ("mixtral-8x7b", _scaled, 2),
]


@pytest.mark.parametrize(("name", "scale", "layers"), CASES, ids=[c[0] for c in CASES])
def test_written_file_reopens_with_every_tensor_as_planned(tmp_path, tokenizer_source, name, scale, layers):
    spec = scale(name) if scale else get_shape(name)
    expected = plan(spec, "Q4_K_M", layers)
    path = tmp_path / f"{name}.gguf"
    try:
        write_spec(spec, path, layers=layers, seed=3, tokenizer_source=tokenizer_source)
        with GGUFFile.open(path) as f:
            _check_file(f, spec, expected, layers)
            assert os.path.getsize(path) - f.tensors["token_embd.weight"].offset == expected.data_bytes
    finally:
        path.unlink(missing_ok=True)


def _check_file(f: GGUFFile, spec, expected, layers: int) -> None:
    meta, arch = f.metadata, spec.arch
    assert f.architecture == arch
    assert meta["general.name"] == f"tandem synth {spec.name}"
    assert meta["general.file_type"] == LlamaFileType.MOSTLY_Q4_K_M
    assert meta[f"{arch}.block_count"] == layers
    assert meta[f"{arch}.expert_count"] == spec.n_expert
    assert len(meta["tokenizer.ggml.tokens"]) == spec.vocab == len(meta["tokenizer.ggml.token_type"])
    if arch == "deepseek2":
        m = spec.mla
        assert meta["deepseek2.attention.key_length_mla"] == m.qk_nope_head_dim + m.qk_rope_head_dim
        assert meta["deepseek2.attention.key_length"] == m.kv_lora_rank + m.qk_rope_head_dim
        assert meta["deepseek2.leading_dense_block_count"] == min(spec.leading_dense, layers)
        assert meta["deepseek2.expert_gating_func"] == (2 if spec.gating == "sigmoid" else 1)
        assert meta["deepseek2.rope.scaling.type"] == "yarn"
        assert meta["deepseek2.attention.q_lora_rank"] == m.q_lora_rank
    assert list(f.tensors) == [t.spec.name for t in expected.tensors]
    assert sum(i.n_bytes for i in f.tensors.values()) == expected.tensor_bytes
    seen = set()
    for t in expected.tensors:
        info = f.tensors[t.spec.name]
        assert (info.ggml_type, info.shape) == (t.ggml_type, t.spec.shape), t.spec.name
        if t.ggml_type in seen and t.spec.kind == "weight":
            continue
        seen.add(t.ggml_type)
        raw = f.tensor(t.spec.name).data
        size = GGML_QUANT_SIZES[t.ggml_type][1]
        n = min(raw.numel() // size, 4096)
        values = dequantize_blocks(raw[: n * size].view(n, size).clone(), t.ggml_type)
        assert torch.isfinite(values).all(), t.spec.name
        if t.spec.kind == "norm":
            assert values.mean().item() == pytest.approx(1.0, abs=0.01)
        elif t.spec.kind != "bias":
            assert values.std().item() == pytest.approx(WEIGHT_STD, rel=0.15), t.spec.name


def test_write_shape_by_name(tmp_path, monkeypatch, tokenizer_source):
    # The public entry point; the tokenizer comes from the embedded model.
    monkeypatch.setattr("tandem.synth.writer.default_tokenizer_source", lambda: tokenizer_source)
    seen = []
    path = write_shape(
        "deepseek-v2-lite", tmp_path / "sub" / "v2.gguf", layers=1, progress=lambda d, t: seen.append((d, t))
    )
    try:
        assert isinstance(path, Path) and not path.with_name("v2.gguf.partial").exists()
        assert seen[-1][0] == seen[-1][1] == plan("deepseek-v2-lite", layers=1).data_bytes
        with GGUFFile.open(path) as f:
            assert f.metadata["deepseek2.leading_dense_block_count"] == 1
            # 1 layer is not llama.cpp's "lite" layer count: q_lora_rank 0 says "no query LoRA"
            assert f.metadata["deepseek2.attention.q_lora_rank"] == 0
            assert f.metadata["tokenizer.ggml.tokens"][-1] == "<|endoftext|>"
    finally:
        path.unlink(missing_ok=True)


def test_tokenizer_padded_and_generated(tmp_path, tokenizer_source):
    n_source = len(tokenizer_source["tokenizer.ggml.tokens"])
    tiny = dataclasses.replace(
        get_shape("qwen3-30b-a3b"), hidden=256, n_head=2, n_head_kv=1, ffn=512, n_expert=4, n_expert_used=2,
        expert_ffn=256, vocab=n_source + 128,
    )  # fmt: skip
    for vocab in (n_source + 128, 1000):
        path = tmp_path / f"v{vocab}.gguf"
        try:
            write_spec(
                dataclasses.replace(tiny, vocab=vocab), path, layers=1, tokenizer_source=tokenizer_source
            )
            with GGUFFile.open(path) as f:
                meta = f.metadata
        finally:
            path.unlink(missing_ok=True)
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == vocab
        if vocab > n_source:
            # the converter's padding: "[PAD{i}]", type UNUSED (5); the rest copied
            assert tokens[n_source:] == [f"[PAD{i}]" for i in range(n_source, vocab)]
            assert set(types[n_source:]) == {5}
            assert tokens[:n_source] == tokenizer_source["tokenizer.ggml.tokens"]
            assert meta["tokenizer.chat_template"] == tokenizer_source["tokenizer.chat_template"]
        else:
            # a consistent byte-level BPE: every merge's parts and result are tokens
            present = set(tokens)
            assert len(present) == vocab and len(set(tokens[:256])) == 256
            merges = meta["tokenizer.ggml.merges"]
            assert merges and all({*m.split(" "), m.replace(" ", "")} <= present for m in merges)
            assert meta["tokenizer.ggml.eos_token_id"] == vocab - 1 and types[-1] == 3


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_tandem_runs_a_synth_file_to_finite_logits(tmp_path, tokenizer_source, name):
    # Scaled down (vocab, experts, Mixtral's width) but with the real hidden size and heads.
    from tandem.inject.model import load_model

    spec = _scaled(name)
    path = write_spec(spec, tmp_path / f"{name}.gguf", layers=2, tokenizer_source=tokenizer_source)
    try:
        loaded = load_model(path)
        try:
            ids = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]])
            with torch.no_grad():
                logits = loaded.model(ids).logits  # [1, T, vocab]
        finally:
            loaded.gguf.close()
        assert logits.shape == (1, ids.shape[1], spec.vocab)
        assert torch.isfinite(logits).all()
        assert 0.1 < logits.std().item() < 10
    finally:
        path.unlink(missing_ok=True)
