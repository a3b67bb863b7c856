"""The fused GPU decode layers give the modules' logits and tokens, eager and replayed."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.kv_cache import new_cache
from tandem.inject.model import load_model
from tandem.ops.decode_layer_cpu import decoder_layers
from tandem.ops.decode_layer_gpu import FUSED_ENV, KERNEL_HANDOVER_ENV
from tandem.synth.tiny import MOE_ARCHS, write_tiny
from tests.gpu.test_graph_decode import CTX, PROMPT, experts_on_cpu_budget, generate

pytestmark = pytest.mark.gpu

# (arch, DeepSeek routing): Qwen2-MoE and DeepSeek have shared experts beside the engine's
# call; DeepSeek's MLA runs as its module between the fused norms.
ARCHS = [(a, "v3") for a in ("llama", "qwen2", *MOE_ARCHS)] + [("deepseek2", "v3"), ("deepseek2", "v2")]
# Both paths round the products' inputs to bf16 (a relative step of 2^-8 = 3.9e-3); the
# norms and softmaxes sum in another order, which can flip single roundings. On the H200
# that moved the tiny models' logits by up to 2.3e-3 (Qwen3-MoE).
LOGIT_REL_ERR = 5e-3


def load(arch: str, tmp_path, monkeypatch, fused: bool, variant: str = "v3"):
    path = tmp_path / "m.gguf"
    if not path.exists():
        write_tiny(arch, path, "Q8_0", variant=variant)
    monkeypatch.setenv(FUSED_ENV, "1" if fused else "0")
    # The planned placement: MoE layers' experts on the CPU engine, all else on the GPU.
    budget = experts_on_cpu_budget(path) if arch in (*MOE_ARCHS, "deepseek2") else 8.0
    return load_model(path, gpu_memory=budget, plan_ctx=CTX).model


def step_logits(model) -> list[torch.Tensor]:
    """The prompt, then three single-token steps on the modules' forward; each step's logits."""
    cache = new_cache(model)
    device = next(p.device for p in model.parameters() if p.device.type == "cuda")
    ids = torch.tensor([PROMPT], device=device)
    out = []
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        for token in (7, 11, 2):
            logits = model(
                input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True
            )
            out.append(logits.logits[0, -1].float().cpu())
    return out


@pytest.mark.parametrize(("arch", "variant"), ARCHS)
def test_fused_layers_equal_the_modules(arch, variant, tmp_path, monkeypatch):
    plain = load(arch, tmp_path, monkeypatch, fused=False, variant=variant)
    fused = load(arch, tmp_path, monkeypatch, fused=True, variant=variant)
    assert set(fused._tandem_gpu_decode_layers.values()) == {"fused"}, fused._tandem_gpu_decode_layers
    assert set(plain._tandem_gpu_decode_layers.values()) == {f"{FUSED_ENV} is off"}
    for got, want in zip(step_logits(fused), step_logits(plain), strict=True):
        assert ((got - want).norm() / want.norm()).item() < LOGIT_REL_ERR
    assert all(layer.forward.calls == 3 for layer in decoder_layers(fused))  # the prompt took the modules
    for graphs in (False, True):
        assert (
            generate(fused, 12, monkeypatch, graphs).token_ids
            == generate(plain, 12, monkeypatch, graphs).token_ids
        )
    assert fused._tandem_graph_decode.broken is None and fused._tandem_graph_decode.replays == 10


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "deepseek2"])
def test_the_kernels_hand_over_as_the_stream_does(arch, tmp_path, monkeypatch):
    """route_pack's request and expert_sum's read of the engine's output give the logits and
    tokens of the stream's own request, wait, clear and copy (shared experts: Qwen2-MoE, DeepSeek)."""
    models = {}
    for kernels in ("0", "1"):
        monkeypatch.setenv(KERNEL_HANDOVER_ENV, kernels)
        models[kernels] = load(arch, tmp_path, monkeypatch, fused=True)
    for got, want in zip(step_logits(models["1"]), step_logits(models["0"]), strict=True):
        assert ((got - want).norm() / want.norm()).item() < 1e-5  # the adds' order alone differs
    for graphs in (False, True):
        assert (
            generate(models["1"], 12, monkeypatch, graphs).token_ids
            == generate(models["0"], 12, monkeypatch, graphs).token_ids
        )
    assert models["1"]._tandem_graph_decode.broken is None


def test_a_masked_or_batched_step_takes_the_modules(tmp_path, monkeypatch):
    fused = load("qwen3moe", tmp_path, monkeypatch, fused=True)
    cache = new_cache(fused)
    ids = torch.tensor([PROMPT, PROMPT], device="cuda:0")  # a batch of two
    with torch.inference_mode():
        fused(input_ids=ids, past_key_values=cache, use_cache=True)
        fused(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert all(layer.forward.calls == 0 for layer in decoder_layers(fused))
