"""QuantLinearGPU against the dense product of the gguf package's dequantized weights.

On a GPU it runs compiled; elsewhere its Triton kernels run under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, under its interpreter (tests/conftest.py)

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from tandem.errors import RuleError
from tandem.ops.linear_gpu import MATVEC_MAX_TOKENS, QuantLinearGPU
from tandem.quant.quant_tensor import QuantTensor
from tests.random_quant import random_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class QuantWeights:
    """Serves one linear layer's weight as GGUF parts (stacked along the outputs) and its bias."""

    def __init__(self, parts: list[tuple[T, int]], cols: int, seed: int):
        self.qts, dense = [], []
        for i, (ggml_type, rows) in enumerate(parts):
            block = GGML_QUANT_SIZES[ggml_type][0]
            raw = random_blocks(ggml_type, rows * cols // block, seed=seed + i, max_exponent=0).reshape(-1)
            self.qts.append(QuantTensor(torch.from_numpy(raw.copy()), ggml_type, (rows, cols), f"part{i}"))
            dense.append(torch.from_numpy(gguf_dequantize(raw, ggml_type).reshape(rows, cols).copy()))
        self.matrix = torch.cat(dense).double()
        self.bias = torch.randn(self.matrix.shape[0], generator=torch.Generator().manual_seed(seed))

    def quant_parts(self, name, shape):
        assert shape == tuple(self.matrix.shape)
        return self.qts

    def dense(self, name, shape, dtype, device):  # the bias
        return self.bias.to(device=device, dtype=dtype)


def layer(weights: QuantWeights, **kwargs) -> QuantLinearGPU:
    out_f, in_f = weights.matrix.shape
    orig = nn.Linear(in_f, out_f, bias=True, device="meta")
    op = QuantLinearGPU("model.layers.0.self_attn.q_proj", orig, None, generate_device=DEVICE, **kwargs)
    op.load(weights)
    return op


# A fused weight of three GGUF parts of different types, one with no Triton kernel.
PARTS = [(T.Q4_K, 24), (T.Q6_K, 8), (T.Q8_0, 16)]
LEGACY = [(T.Q4_K, 16), (T.Q5_0, 8)]


@pytest.mark.parametrize("parts", [PARTS, LEGACY], ids=["k-quants", "with-q5_0"])
@pytest.mark.parametrize("dequant,dtype", [("load", "float32"), ("load", "bfloat16"), ("none", "bfloat16")])
@pytest.mark.parametrize("n", [1, MATVEC_MAX_TOKENS + 3])
def test_matches_the_dense_product(parts, dequant, dtype, n):
    weights = QuantWeights(parts, 512, seed=n)
    op = layer(weights, dequant=dequant, dtype=dtype)
    x = torch.randn(1, n, 512, generator=torch.Generator().manual_seed(3))
    y = op(x)
    assert y.shape == (1, n, weights.matrix.shape[0]) and y.dtype == x.dtype
    want = x.double() @ weights.matrix.T + weights.bias.double()
    magnitude = x.double().abs() @ weights.matrix.abs().T + weights.bias.double().abs()
    # float32 arithmetic where every weight stays float32 (dequant=load in float32, or the
    # matvec of a few tokens); bf16 weights and activations: 2^-8 relative each.
    exact = dtype == "float32" or (dequant == "none" and n <= MATVEC_MAX_TOKENS and parts == PARTS)
    bound = 1e-5 if exact else 2 * 2**-8
    assert ((y.double() - want).abs() <= bound * magnitude + 1e-6).all()


def test_keeps_blocks_on_the_device_without_a_dense_copy():
    weights = QuantWeights(PARTS, 512, seed=1)
    op = layer(weights, dequant="none")
    assert all(p.dense is None and p.blocks.dtype == torch.uint8 for p in op.parts)
    assert sum(p.blocks.numel() for p in op.parts) == sum(qt.data.numel() for qt in weights.qts)


def test_refuses_bad_settings():
    orig = nn.Linear(256, 16, device="meta")
    with pytest.raises(RuleError, match="dequant must be one of"):
        QuantLinearGPU("k", orig, None, generate_device=DEVICE, dequant="call")
    with pytest.raises(RuleError, match="computes in"):
        QuantLinearGPU("k", orig, None, generate_device=DEVICE, dtype="float16")
    with pytest.raises(RuleError, match=r"replaces nn\.Linear"):
        QuantLinearGPU("k", nn.LayerNorm(4, device="meta"), None, generate_device=DEVICE)


@pytest.mark.parametrize("n", [6, 20])  # the matvec, and a per-call dequantization
def test_a_model_on_the_kernels_gives_the_reference_logits(tmp_path, n):
    from tandem.cpu.engine import torch_reference
    from tandem.inject.loader import default_rules
    from tandem.inject.model import load_model
    from tandem.synth.tiny import write_tiny

    path = write_tiny("qwen2", tmp_path / "qwen2.gguf", "Q8_0")  # q/k/v biases, a tied LM head
    rules = tmp_path / "gpu.yaml"
    rules.write_text(
        "- match: {class: torch.nn.Linear}\n"
        "  replace: {class: tandem.ops.linear_gpu.QuantLinearGPU, kwargs: {dequant: none, dtype: float32}}\n"
        + default_rules("qwen2").read_text(encoding="utf-8")
    )
    ours = load_model(path, rules=rules, device=DEVICE)
    assert sum(isinstance(m, QuantLinearGPU) for m in ours.model.modules()) > 0
    with torch_reference():
        ref = load_model(path)
    ids = torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.inference_mode():
        got = ours.model(input_ids=ids.to(DEVICE)).logits.cpu()
        want = ref.model(input_ids=ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("n", [7, 12])  # the routed matvec kernels, and per-expert dequantization
def test_experts_with_their_blocks_on_the_device_match_the_mapped_ones(tmp_path, n):
    from tandem.inject.loader import build_meta_model, default_rules, optimize_and_load_gguf
    from tandem.ops.experts import QuantExperts
    from tandem.synth.tiny import write_tiny
    from tandem.weights.arch import config_of
    from tandem.weights.gguf_file import GGUFFile

    path = write_tiny("qwen3moe", tmp_path / "moe.gguf", "Q8_0")
    rules = tmp_path / "experts.yaml"
    default = default_rules("qwen3moe").read_text(encoding="utf-8")
    outs = []
    for on_device in (True, False):
        rules.write_text(
            "- match: {class: transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts}\n"
            f"  replace: {{class: tandem.ops.experts.QuantExperts, kwargs: {{blocks_on_device: {str(on_device).lower()}}}}}\n"
            + default
        )
        gguf = GGUFFile.open(path)
        config = config_of(gguf)
        model = build_meta_model(config)
        optimize_and_load_gguf(model, rules, gguf, config, default_device=DEVICE)
        experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
        assert experts and all(bool(m.on_device) == on_device for m in experts)
        assert all(m.capturable == on_device for m in experts)
        if on_device:
            assert all(m.gate.data.device.type == torch.device(DEVICE).type for m in experts)
        ids = torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            outs.append(model(input_ids=ids.to(DEVICE)).logits.cpu())
    assert ((outs[0] - outs[1]).norm() / outs[1].norm()).item() < 1e-6  # float32 sums in another order
