"""DeepSeek-V2/V3 (GGUF `deepseek2`): tiny random Hugging Face models written to GGUF as llama.cpp
writes them (split attn_k_b/attn_v_b and the older attn_kv_b) load back to the same logits and
tokens; absorbed decode equals plain; metadata that disagrees with the tensors is refused."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch

from tandem.cpu.engine import torch_reference
from tandem.engine.generate import prefill_and_generate
from tandem.errors import GGUFError, UnsupportedError
from tandem.inject.loader import RULES_DIR, build_meta_model, default_rules, optimize_and_load_gguf
from tandem.ops.experts import QuantExperts
from tandem.ops.mla import MLAttention
from tandem.ops.routers import DeepseekV2Router, DeepseekV3Router
from tandem.synth.tiny import tiny_model, write_gguf
from tandem.weights.arch import config_of, get_architecture
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
# Q8_0 (router, norms and rows shorter than a block in float) against the float model: measured
# 0.02-0.09 for V2 and 0.04-0.29 for V3, where near-tied biased sigmoid scores flip experts;
# against Hugging Face on the same dequantized Q8_0 weights the F32 bound holds.
Q8_REL_ERR = 0.5
ABSORBED_REL_ERR = 1e-5  # absorbed and plain MLA differ only in float32 summation order
Q8 = gguf.GGMLQuantizationType.Q8_0
# (variant, q_lora_rank, topk_method, split_kv): every combination the families need, both kv_b forms.
CASES = {
    "v2-no-qlora-kv_b": ("v2", None, "group_limited_greedy", False),
    "v2-qlora-split": ("v2", 32, "group_limited_greedy", True),
    "v2-greedy-split": ("v2", None, "greedy", True),
    "v3-qlora-split": ("v3", 32, None, True),
    "v3-no-qlora-kv_b": ("v3", None, None, False),
}


def _load(path, rules=None):
    gguf_file = GGUFFile.open(path)
    config = config_of(gguf_file)
    model = build_meta_model(config)
    rules = rules or default_rules(gguf_file.architecture, gguf_file.tensors)
    optimize_and_load_gguf(model, rules, gguf_file, config)
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(case name, Hugging Face model, F32 GGUF with a tokenizer, Q8_0 GGUF)."""
    variant, q_lora, method, split = CASES[request.param]
    options = {"variant": variant, "q_lora_rank": q_lora, "yarn": True}
    if method:
        options["topk_method"] = method
    reference = tiny_model("deepseek2", **options)
    folder = tmp_path_factory.mktemp(request.param)
    f32 = write_gguf(reference, "deepseek2", folder / "f32.gguf", tokenizer=True, split_kv=split)
    q8 = write_gguf(reference, "deepseek2", folder / "q8.gguf", Q8, split_kv=split)
    return request.param, reference, f32, q8


def test_config_and_operators(case):
    name, reference, path, _ = case
    variant, _, method, split = CASES[name]
    with GGUFFile.open(path) as f:
        assert ("attn_k_b.weight" in " ".join(f.tensors)) == split
        config = config_of(f)
        assert default_rules(f.architecture, f.tensors).name == "deepseek2.yaml"
    ref = reference.config
    assert type(config) is type(ref)
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "first_k_dense_replace", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "moe_intermediate_size"):  # fmt: skip
        assert getattr(config, key) == getattr(ref, key), key
    assert config.rope_parameters == pytest.approx(ref.rope_parameters)
    if variant == "v2":
        assert config.topk_method == method
    model = _load(path)
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn, MLAttention) and layer.self_attn.generate_op == "absorbed"
    assert isinstance(layer.mlp.gate, DeepseekV2Router if variant == "v2" else DeepseekV3Router)
    assert isinstance(layer.mlp.experts, QuantExperts)


def test_f32_logits_match_hf(case):
    _, reference, path, _ = case
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert _rel_err(_load(path)(ids).logits, reference(ids).logits) < F32_REL_ERR


def test_q8_logits_close_to_hf(case):
    _, reference, _, path = case
    ids = torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        err = _rel_err(_load(path)(ids).logits, reference(ids).logits)
    assert 0 < err < Q8_REL_ERR


def test_q8_logits_match_hf_on_the_dequantized_weights(case):
    _, reference, _, path = case
    hf = copy.deepcopy(reference)
    with GGUFFile.open(path) as f:
        config = config_of(f)
        weights = GGUFWeights(f, get_architecture(f.architecture, f.tensors), config)
        hf.load_state_dict({name: weights.dense(name, tuple(t.shape)) for name, t in hf.state_dict().items()})
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert _rel_err(_load(path)(ids).logits, hf(ids).logits) < F32_REL_ERR


def test_greedy_tokens_match_hf(case):
    _, reference, path, _ = case
    model = _load(path)
    with GGUFFile.open(path) as f:
        tokenizer = load_tokenizer(f.metadata)
    prompt = [1, 5, 9, 13, 17]
    args = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        theirs = reference.generate(torch.tensor([prompt]), **args)[0, len(prompt) :].tolist()
        ours = model.generate(torch.tensor([prompt]), **args)[0, len(prompt) :].tolist()
        loop = prefill_and_generate(model, tokenizer, prompt, max_new_tokens=16).token_ids
    assert ours == theirs
    assert loop == theirs
    assert len(set(theirs)) > 2  # not a degenerate repetition


def test_absorbed_decode_equals_plain(case, tmp_path):
    _, _, path, _ = case
    plain_rules = tmp_path / "plain.yaml"
    text = (RULES_DIR / "deepseek2.yaml").read_text()
    plain_rules.write_text(text.replace("generate_op: absorbed", "generate_op: plain"))
    absorbed, plain = _load(path), _load(path, plain_rules)
    assert plain.model.layers[0].self_attn.generate_op == "plain"
    prompt = torch.tensor([[1, 7, 3, 22, 40, 9]])
    args = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    args |= dict(return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        a, p = absorbed.generate(prompt, **args), plain.generate(prompt, **args)
    assert torch.equal(a.sequences, p.sequences)
    assert _rel_err(torch.stack(a.logits), torch.stack(p.logits)) < ABSORBED_REL_ERR


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("attention.kv_lora_rank", 16, r"attn_kv_a_mqa.weight.*shape \[48, 64\].*kv_lora_rank = 16"),
        ("expert_count", 6, r"ffn_gate_inp.weight.*expert_count = 6"),
        ("expert_feed_forward_length", 64, r"ffn_gate_exps.weight.*expert_feed_forward_length = 64"),
        ("attention.head_count", 8, r"has shape .*head_count = 8"),
        ("leading_dense_block_count", 0, r"blk.0.ffn_gate_inp.weight' is missing"),
        ("rope.dimension_count", 8, r"attn_kv_a_mqa.weight.*rope.dimension_count = 8"),
    ],
)
def test_metadata_that_disagrees_with_tensors_is_refused(case, key, value, message):
    _, _, path, _ = case
    with GGUFFile.open(path) as f:
        metadata = {**f.metadata, f"deepseek2.{key}": value}
        shapes = {name: info.shape for name, info in f.tensors.items()}
    with pytest.raises(GGUFError, match=message):
        get_architecture("deepseek2", shapes).hf_config(metadata, shapes)


def test_q_lora_rank_must_match_the_query_tensors(case):
    name, _, path, _ = case
    with GGUFFile.open(path) as f:
        metadata = dict(f.metadata)
        shapes = {n: info.shape for n, info in f.tensors.items()}
    has_lora = CASES[name][1] is not None
    metadata["deepseek2.attention.q_lora_rank"] = 0 if has_lora else 32
    message = r"attn_q_a.weight exists" if has_lora else r"attn_q_a.weight' is missing"
    with pytest.raises(GGUFError, match=message):
        get_architecture("deepseek2", shapes).hf_config(metadata, shapes)


def test_synth_deepseek_v2_lite_loads_to_finite_logits(tmp_path):
    from tandem.inject.model import load_model
    from tandem.synth import write_shape

    path = write_shape("deepseek-v2-lite", tmp_path / "lite.gguf", "Q4_K_M", layers=2)
    loaded = load_model(path)
    try:
        assert isinstance(loaded.model.model.layers[1].self_attn, MLAttention)
        ids = torch.tensor([loaded.tokenizer("The capital of France is")["input_ids"]])
        with torch.no_grad():
            logits = loaded.model(ids).logits  # [1, T, vocab]
    finally:
        loaded.gguf.close()
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_family_follows_the_gating_function_and_the_routing_bias(case):
    name, _, path, _ = case
    with GGUFFile.open(path) as f:
        metadata = dict(f.metadata)
        shapes = {n: info.shape for n, info in f.tensors.items()}
    arch = get_architecture("deepseek2", shapes)
    family = "DeepseekV3Config" if CASES[name][0] == "v3" else "DeepseekV2Config"
    del metadata["deepseek2.expert_gating_func"]  # older files: the bias alone tells V3
    assert type(arch.hf_config(metadata, shapes)).__name__ == family
    metadata["deepseek2.expert_gating_func"] = 1 if family == "DeepseekV3Config" else 2
    message = "softmax gating with exp_probs_b" if family == "DeepseekV3Config" else "no exp_probs_b"
    with pytest.raises(UnsupportedError, match=message):
        arch.hf_config(metadata, shapes)
    metadata["deepseek2.expert_gating_func"] = 3
    with pytest.raises(UnsupportedError, match="expert_gating_func = 3"):
        arch.hf_config(metadata, shapes)
