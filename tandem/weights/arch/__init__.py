"""Architectures by GGUF `general.architecture` name; each file holds one family."""

from __future__ import annotations

from collections.abc import Collection

from transformers import PretrainedConfig

from tandem.errors import UnsupportedError
from tandem.weights.arch.base import Architecture
from tandem.weights.arch.deepseek2 import Deepseek2
from tandem.weights.arch.gemma3 import Gemma3
from tandem.weights.arch.llama import Llama
from tandem.weights.arch.mixtral import Mixtral
from tandem.weights.arch.qwen2 import Qwen2
from tandem.weights.arch.qwen2moe import Qwen2Moe
from tandem.weights.arch.qwen3moe import Qwen3Moe

# Classes sharing a GGUF name are asked in this order: the more specific one first.
ARCHITECTURES: dict[str, tuple[type[Architecture], ...]] = {}
for _cls in (Mixtral, Llama, Qwen2, Gemma3, Qwen2Moe, Qwen3Moe, Deepseek2):
    ARCHITECTURES[_cls.gguf_name] = (*ARCHITECTURES.get(_cls.gguf_name, ()), _cls)


def config_of(gguf) -> PretrainedConfig:
    """The Hugging Face config a GGUFFile's metadata describes."""
    shapes = {name: info.shape for name, info in gguf.tensors.items()}
    return get_architecture(gguf.architecture, shapes).hf_config(gguf.metadata, shapes)


def get_architecture(name: str, tensor_names: Collection[str] = ()) -> Architecture:
    """The architecture of a GGUF `general.architecture`; its tensor names pick among
    families that share the name (GGUF `llama`: dense Llama, or Mixtral with experts)."""
    try:
        candidates = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(f"architecture {name!r} is not supported (supported: {known})") from None
    return next(cls for cls in candidates if cls is candidates[-1] or cls.claims(tensor_names))()
