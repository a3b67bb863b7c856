"""Architectures by GGUF `general.architecture` name; each file holds one family."""

from __future__ import annotations

from transformers import PretrainedConfig

from tandem.errors import UnsupportedError
from tandem.weights.arch.base import Architecture
from tandem.weights.arch.gemma3 import Gemma3
from tandem.weights.arch.llama import Llama
from tandem.weights.arch.qwen2 import Qwen2

ARCHITECTURES: dict[str, type[Architecture]] = {cls.gguf_name: cls for cls in (Llama, Qwen2, Gemma3)}


def config_of(gguf) -> PretrainedConfig:
    """The Hugging Face config a GGUFFile's metadata describes."""
    shapes = {name: info.shape for name, info in gguf.tensors.items()}
    return get_architecture(gguf.architecture).hf_config(gguf.metadata, shapes)


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]()
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(f"architecture {name!r} is not supported (supported: {known})") from None
