"""Build a Hugging Face model on the meta device, inject operators by rules, load weights from GGUF."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from tandem.cpu.heap import retain_freed_memory
from tandem.cpu.torch_threads import install_decode_threads
from tandem.errors import UnsupportedError, WeightError
from tandem.inject.injector import Placement, inject
from tandem.inject.rules import Rule, load_rules
from tandem.ops.attention_cpu import ENGINE_FLAG
from tandem.ops.attention_cpu import IMPLEMENTATION as CPU_ATTENTION
from tandem.ops.base import TandemModule
from tandem.ops.decode_layer_cpu import fuse_decoder_layers
from tandem.ops.decode_layer_gpu import fuse_gpu_decoder_layers
from tandem.ops.linear_gpu_fused import fuse_shared_inputs
from tandem.ops.rope_cpu import install as install_engine_rope
from tandem.weights.arch import get_architecture
from tandem.weights.gguf_file import GGUFFile
from tandem.weights.safetensors_source import SafetensorsWeights
from tandem.weights.source import GGUFWeights

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"


# Hugging Face model_type -> shipped rule file (named by GGUF architecture)
MODEL_TYPE_RULES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "mixtral": "mixtral",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}


def default_rules(architecture: str, tensor_names: Collection[str] = ()) -> Path:
    """The rule file shipped for a GGUF architecture (its tensor names tell Llama from Mixtral)."""
    return RULES_DIR / get_architecture(architecture, tensor_names).rules_file


def default_rules_for_config(config: PretrainedConfig) -> Path:
    """The rule file shipped for a Hugging Face config's model_type."""
    name = MODEL_TYPE_RULES.get(config.model_type)
    path = RULES_DIR / f"{name}.yaml"
    if name is None or not path.is_file():
        known = ", ".join(t for t, r in MODEL_TYPE_RULES.items() if (RULES_DIR / f"{r}.yaml").is_file())
        raise UnsupportedError(
            f"no default rules for model type {config.model_type!r} (known: {known}); pass rules"
        )
    return path


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Create parameters on the meta device (no memory), keep buffers real.

    Buffers such as rotary frequencies and Gemma's embedding scale are computed in
    __init__ and are not in the weight file, so they must hold real values.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The Hugging Face causal LM for `config` with every parameter on the meta device."""
    with meta_parameters():
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=CPU_ATTENTION, dtype=torch.float32
        )
    return model.eval()


def optimize_and_load_gguf(
    model: nn.Module,
    rule_path: str | Path | list[Rule],
    gguf_path: str | Path | GGUFFile,
    config: PretrainedConfig,
    default_device: str = "cpu",
    progress: bool = False,
) -> list[Placement]:
    """Inject the rules' operators into `model` (built on meta) and load every weight from the GGUF.

    Operators load their own weights; modules no rule replaced get their parameters
    dequantized onto their device. Returns where each matched module went.
    """
    gguf = gguf_path if isinstance(gguf_path, GGUFFile) else GGUFFile.open(gguf_path)
    weights = GGUFWeights(gguf, get_architecture(gguf.architecture, gguf.tensors), config)
    placements = optimize_and_load(model, rule_path, weights, config, default_device, progress)
    # Operators that dequantize per call hold views of the mapped file: keep it open with the model.
    model._tandem_gguf = gguf
    return placements


def optimize_and_load(
    model: nn.Module,
    rule_path: str | Path | list[Rule],
    weights: GGUFWeights | SafetensorsWeights,
    config: PretrainedConfig,
    default_device: str = "cpu",
    progress: bool = False,
) -> list[Placement]:
    """optimize_and_load_gguf for any weights object (GGUFWeights, SafetensorsWeights)."""
    rules = rule_path if isinstance(rule_path, list) else load_rules(rule_path)
    placements, devices = inject(model, rules, config, default_device)
    if any(str(d).startswith("cuda") for d in (default_device, *devices.values())):
        check_gpu_switches()  # a bad value fails here, before the weights load
    load_weights(model, weights, devices, progress)
    fuse_shared_inputs(model)  # GPU projections of one input as one product
    if any(str(d).startswith("cuda") for d in (default_device, *devices.values())):
        model._tandem_gpu_decode_layers = fuse_gpu_decoder_layers(model)  # a decode step in fewer kernels
    # A model run on the CPU whose operators took the engine gets the engine's CPU-side
    # helpers too; a GPU model with its experts on the engine (a hybrid plan) keeps torch's.
    on_cpu = torch.device(default_device).type == "cpu"
    if on_cpu and any(getattr(m, "backend", None) == "engine" for m in model.modules()):
        install_decode_threads(model)
        retain_freed_memory()  # a prompt's torch ops reuse freed buffers instead of faulting in new ones
        setattr(model.config, ENGINE_FLAG, True)  # decode attention on the engine too
        install_engine_rope(model)  # a prompt's RoPE too
        model._tandem_decode_layers = fuse_decoder_layers(model)  # each decode layer in one native call
    return placements


def check_gpu_switches() -> None:
    """Read every environment switch of the GPU path once, so that a bad value is an error now."""
    from tandem.engine.graph_decode import graphs_enabled
    from tandem.gpu.mailbox import handover_asked
    from tandem.gpu.prefill_split import split_enabled
    from tandem.ops.attention_cpu import gpu_kernel_enabled
    from tandem.ops.decode_layer_gpu import fused_decode_enabled

    graphs_enabled(), handover_asked(), split_enabled(), gpu_kernel_enabled(), fused_decode_enabled()


def load_weights(
    model: nn.Module,
    weights: GGUFWeights | SafetensorsWeights,
    devices: dict[str, str],
    progress: bool = False,
) -> None:
    modules = list(model.named_modules())
    ops = [(path, m) for path, m in modules if isinstance(m, TandemModule)]
    inside_op = tuple(f"{path}." for path, _ in ops)
    plain = [
        (path, m)
        for path, m in modules
        if not isinstance(m, TandemModule) and not path.startswith(inside_op or ("\0",))
    ]
    loaded: dict[int, nn.Parameter] = {}  # tied parameters (one object, two names) are loaded once
    bar = tqdm(total=len(ops) + len(plain), desc="loading", unit="module", disable=not progress, leave=False)
    for _, op in ops:
        op.load(weights)
        bar.update()
    for path, module in plain:
        device = devices.get(path, devices[""])
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{path}.{name}" if path else name
            if id(param) not in loaded:
                values = weights.dense(full, tuple(param.shape), torch.float32, device)
                loaded[id(param)] = nn.Parameter(values, requires_grad=False)
            module._parameters[name] = loaded[id(param)]
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
        bar.update()
    bar.close()
    _check_nothing_on_meta(model)


def _check_nothing_on_meta(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta":
            raise WeightError(f"{name} was not loaded: no rule's operator and no weight tensor provided it")
