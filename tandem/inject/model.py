"""One call from a GGUF path or a Hugging Face directory to a ready model: config, tokenizer,
chat template, injected weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tandem.errors import TandemError
from tandem.inject.injector import Placement
from tandem.inject.loader import (
    build_meta_model,
    default_rules,
    default_rules_for_config,
    optimize_and_load,
    optimize_and_load_gguf,
)
from tandem.weights.arch import config_of
from tandem.weights.chat_template import FALLBACK_CHAT_TEMPLATE, chat_template_of
from tandem.weights.gguf_file import GGUFFile
from tandem.weights.safetensors_file import SafetensorsFile, is_hf_directory
from tandem.weights.safetensors_source import SafetensorsWeights, hf_stop_token_ids
from tandem.weights.tokenizer import eos_token_ids, load_tokenizer


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    gguf: GGUFFile | SafetensorsFile  # the open weights, whichever format they came in
    chat_template: str
    chat_template_is_fallback: bool
    stop_token_ids: list[int]
    placements: list[Placement] = field(default_factory=list)

    @property
    def name(self) -> str:
        if isinstance(self.gguf, SafetensorsFile):
            return self.gguf.directory.name
        return str(self.gguf.metadata.get("general.name") or self.gguf.paths[0].stem)


def load_model(
    path: str | Path,
    rules: str | Path | None = None,
    config_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
    gpu_memory: float | None = None,
    plan_ctx: int = 4096,
) -> LoadedModel:
    """Open a GGUF file (or split set), build its model on meta, inject the rules, load the weights.

    gpu_memory: GiB of GPU memory to plan a placement for (tandem/inject/plan.py) instead of
    running everything on `device`; the plan's KV cache holds plan_ctx tokens. Without a
    CUDA device, or with 0, everything runs on the CPU.

    A Hugging Face directory (config.json and safetensors, no .gguf file) is loaded
    from its config.json, tokenizer and safetensors instead.
    config_dir: take the config and tokenizer from a Hugging Face model directory instead
    of the GGUF metadata (the weights still come from the GGUF).
    """
    if is_hf_directory(Path(path)):
        if gpu_memory is not None:
            raise TandemError(
                f"{path}: a GPU memory budget plans GGUF files; give a Hugging Face directory rules"
            )
        if config_dir is not None:
            raise TandemError(
                f"{path} is a Hugging Face directory: it brings its own config, drop config_dir"
            )
        return _load_hf_directory(Path(path), rules, device, progress)
    gguf = GGUFFile.open(path)
    try:
        if config_dir is not None:
            config, tokenizer = _from_config_dir(Path(config_dir))
        else:
            config = config_of(gguf)
            tokenizer = load_tokenizer(gguf.metadata)
        template, is_fallback = chat_template_of(gguf.metadata)
        if config_dir is not None and getattr(tokenizer, "chat_template", None):
            template, is_fallback = tokenizer.chat_template, False
        model = build_meta_model(config)
        chosen: str | Path | list = rules or default_rules(gguf.architecture, gguf.tensors)
        if gpu_memory is not None:
            if rules is not None:
                raise TandemError("give either rules or a GPU memory budget to plan them, not both")
            chosen, device = _planned_rules(gguf, config, Path(chosen), gpu_memory, plan_ctx, device)
        placements = optimize_and_load_gguf(model, chosen, gguf, config, device, progress)
    except BaseException:
        gguf.close()
        raise
    stops = eos_token_ids(gguf.metadata, tokenizer)
    return LoadedModel(model, tokenizer, config, gguf, template, is_fallback, stops, placements)


def _planned_rules(gguf: GGUFFile, config, default: Path, gpu_memory: float, ctx: int, device: str):
    """(rules, device) of the placement planned for `gpu_memory` GiB on `device` if it is a
    GPU, else on the first one."""
    import torch

    from tandem.inject.plan import GIB, plan_placement
    from tandem.inject.rules import load_rules, parse_rules

    if gpu_memory < 0:
        raise TandemError(f"the GPU memory budget must be at least 0 GiB, got {gpu_memory}")
    budget = int(gpu_memory * GIB) if torch.cuda.is_available() else 0
    gpu = device if torch.device(device).type == "cuda" else "cuda:0"
    plan = plan_placement(gguf, config, load_rules(default), budget, ctx, gpu)
    if not plan.dense_mode:
        return default, "cpu"
    return parse_rules(plan.rules_yaml(default.read_text(encoding="utf-8")), "placement plan"), plan.device


def _load_hf_directory(directory: Path, rules: str | Path | None, device: str, progress: bool) -> LoadedModel:
    config, tokenizer = _from_config_dir(directory)
    file = SafetensorsFile.open(directory)
    try:
        weights = SafetensorsWeights(file, config)  # reads the FP8 block size from the config
        # The weights are served dequantized, so the skeleton must be a plain, unquantized model.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = build_meta_model(config)
        placements = optimize_and_load(
            model, rules or default_rules_for_config(config), weights, config, device, progress
        )
    except BaseException:
        file.close()
        raise
    template = getattr(tokenizer, "chat_template", None)
    is_fallback = not (isinstance(template, str) and template.strip())
    stops = hf_stop_token_ids(directory, tokenizer)
    return LoadedModel(
        model,
        tokenizer,
        config,
        file,
        FALLBACK_CHAT_TEMPLATE if is_fallback else template,
        is_fallback,
        stops,
        placements,
    )


def _from_config_dir(directory: Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    if not (directory / "config.json").is_file():
        raise TandemError(f"{directory} has no config.json")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise TandemError(
            f"cannot load the config or tokenizer from {directory}: {' '.join(str(error).split())}"
        ) from None
    return config, tokenizer
