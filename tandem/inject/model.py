"""One call from a GGUF path to a ready model: config, tokenizer, chat template, injected weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from tandem.errors import TandemError
from tandem.inject.injector import Placement
from tandem.inject.loader import build_meta_model, default_rules, optimize_and_load_gguf
from tandem.weights.arch import config_of
from tandem.weights.chat_template import chat_template_of
from tandem.weights.gguf_file import GGUFFile
from tandem.weights.tokenizer import eos_token_ids, load_tokenizer


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    gguf: GGUFFile
    chat_template: str
    chat_template_is_fallback: bool
    stop_token_ids: list[int]
    placements: list[Placement] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.gguf.metadata.get("general.name") or self.gguf.paths[0].stem)


def load_model(
    path: str | Path,
    rules: str | Path | None = None,
    config_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> LoadedModel:
    """Open a GGUF file (or split set), build its model on meta, inject the rules, load the weights.

    config_dir: take the config and tokenizer from a Hugging Face model directory instead
    of the GGUF metadata (the weights still come from the GGUF).
    """
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
        placements = optimize_and_load_gguf(
            model, rules or default_rules(gguf.architecture, gguf.tensors), gguf, config, device, progress
        )
    except BaseException:
        gguf.close()
        raise
    stops = eos_token_ids(gguf.metadata, tokenizer)
    return LoadedModel(model, tokenizer, config, gguf, template, is_fallback, stops, placements)


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
