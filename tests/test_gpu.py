"""The same operators and rules on a CUDA GPU: logits and greedy tokens equal the CPU's (tiny models)."""

from __future__ import annotations

import gguf
import pytest
import torch
from tiny_models import tiny_model, write_gguf

from tandem.cpu.engine import torch_reference
from tandem.engine.generate import prefill_and_generate
from tandem.inject.loader import build_meta_model, default_rules, optimize_and_load_gguf
from tandem.weights.arch import config_of
from tandem.weights.gguf_file import GGUFFile

pytestmark = pytest.mark.gpu

GPU_REL_ERR = 1e-4  # float32 on both; cuBLAS sums in another order (TF32 stays off)


class _Ids:
    """The engine only needs to decode ids; a stand-in tokenizer."""

    def decode(self, ids, **_):
        return "".join(chr(65 + i % 26) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [chr(65 + i % 26) for i in ids]


def _load(path, device, dequant_call=False, tmp_path=None):
    gguf_file = GGUFFile.open(path)
    config = config_of(gguf_file)
    model = build_meta_model(config)
    rules = default_rules(gguf_file.architecture)
    if dequant_call:
        rules = tmp_path / "call.yaml"
        rules.write_text(
            "- match: {class: torch.nn.Linear}\n"
            "  replace: {class: tandem.ops.linear.QuantLinear, kwargs: {dequant: call}}\n"
        )
    if device == "cpu":  # the reference: float32 torch operators, not the engine's 8-bit activations
        with torch_reference():
            optimize_and_load_gguf(model, rules, gguf_file, config, default_device=device)
    else:
        optimize_and_load_gguf(model, rules, gguf_file, config, default_device=device)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_gpu_logits_equal_cpu(arch, tmp_path):
    path = write_gguf(tiny_model(arch), arch, tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q8_0)
    cpu, gpu = _load(path, "cpu"), _load(path, "cuda:0")
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, ref = gpu(ids.cuda()).logits.cpu(), cpu(ids).logits
    assert ((ours - ref).norm() / ref.norm()).item() < GPU_REL_ERR


def test_gpu_per_call_dequant_and_generation(tmp_path):
    path = write_gguf(tiny_model("qwen2"), "qwen2", tmp_path / "m.gguf", gguf.GGMLQuantizationType.Q8_0)
    cpu = _load(path, "cpu")
    gpu = _load(path, "cuda:0", dequant_call=True, tmp_path=tmp_path)
    prompt = [5, 9, 13, 17]
    on_cpu = prefill_and_generate(cpu, _Ids(), prompt, 16)
    on_gpu = prefill_and_generate(gpu, _Ids(), prompt, 16)
    assert on_gpu.token_ids == on_cpu.token_ids
